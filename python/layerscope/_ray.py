"""Moment passes on a Ray cluster: what ``backend="ray"`` runs (``cka`` linear, ``spectrum``,
``alignment``, ``analyze``).

How a pass is cut (the units are the planner's, ``layerscope_core::engine::moments::partial``):

* **Plan** — made on the driver under the budget in force there (``max_memory``, else
  ``LAYERSCOPE_MAX_MEMORY``, else the driver's memory): the exact linear pass as a
  :class:`~layerscope._native.TilePlan` (one diagonal tile for a single pass, or the tiles of
  a tiled plan), or one single-pass tile per moment tile of spectra and alignment.
* **Tasks** — each tile is cut into contiguous row ranges of near-equal size (a cut moves to
  a shard boundary close to it); one task per ``(tile, range)``. A task opens the sources where
  they lie — the store's path, on storage every node sees; in-memory arrays from Ray's object
  store — checks that the store's manifest fingerprint (SHA-256) is the driver's, and streams
  its rows through the one block reader into the tile's accumulator, under the tile's
  reference shift sampled once over **all** rows on the driver. It returns the serialised
  partial sums. Tasks ask Ray for ``num_cpus`` = the CPUs of the smallest node (one task fills
  a node; its Rust threads are set to that many) and ``memory`` = the tile's peak, so a node
  never runs more tasks than its memory holds.
* **Merge** — the partials of one tile are merged by tasks in a balanced tree of adjacent
  ranges (``((r0 r1) (r2 r3)) r4``: a merge puts the right range's rows after the left's),
  added straight from their bytes when they share the tile's shift; the driver merges only
  the root's two halves as they arrive (one transfer of the largest partial less than a
  root task), one tile at a time, and finalises it.

Equal to the local pass to rounding (f64: 1e-10, f32: 1e-6; tested on a head and two
worker nodes). The Gram route (few rows against wide layers) needs every row of a layer at
once and is cheapest on one machine: it runs on the driver, as ``meta["tasks"]`` says.

``device=`` (``"cuda"``, ``"cpu"``, ``"auto"``): each range task forms its tile's products
on the torch engine (:func:`run_tile_device`, :mod:`layerscope._device`) on that kind of
device — for CUDA the task asks Ray for one GPU (``num_gpus=1``) besides its CPUs and uses
the one Ray gives it — and returns the same serialised partial, merged as above. Ray, not
the caller, places tasks on GPUs; the plan is the driver's (its tiles sized to the host
budget; set ``LAYERSCOPE_MAX_DEVICE_MEMORY`` on the nodes to size the device blocks).
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from . import _native
from ._optional import require
from ._progress import Progress
from ._source import Source, native_part
from .errors import (
    ClusterError,
    InvalidArgumentError,
    LayerscopeError,
    MemoryBudgetError,
    MismatchError,
)

#: A range task gets at least this many rows (fewer are not worth a task).
MIN_TASK_ROWS = 1024
#: Range tasks per task slot of the cluster (one wave: each task costs an accumulator).
TASKS_PER_SLOT = 1


#: Times Ray re-runs a task whose worker or node died (a task's own error is not retried:
#: layerscope's errors are deterministic).
MAX_RETRIES = 3
#: Seconds a job waits while no alive node could run its tasks before it gives up.
NO_NODE_SECONDS = 60.0
#: Seconds between looks at the cluster while nothing finishes.
POLL_SECONDS = 1.0


#: The job id of the session :func:`connect` started (a local instance), if any.
_OWNED: dict[str, str | None] = {"job": None}


def connect(address: str | None = None) -> Any:
    """The ``ray`` module with a session: the running one when ``ray.is_initialized()``;
    else ``ray.init(address=...)`` from ``address``, else ``RAY_ADDRESS``; else a local
    instance bound to 127.0.0.1 only (no dashboard)."""
    ray = require("ray", "backend='ray'")
    if not ray.is_initialized():
        addr = address if address is not None else os.environ.get("RAY_ADDRESS") or None
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if addr in (None, "", "local"):
            ray.init(_node_ip_address="127.0.0.1", **kw)
            _OWNED["job"] = _job(ray)
        else:
            ray.init(address=addr, **kw)
    return ray


def _job(ray: Any) -> str | None:
    try:
        return str(ray.get_runtime_context().get_job_id())
    except Exception:  # noqa: BLE001 - only an identity
        return None


class Cluster(NamedTuple):
    """What the plan of tasks needs of the cluster."""

    nodes: int
    cpus_per_task: int
    slots: int
    memory: int


def cluster(ray: Any) -> Cluster:
    """Alive nodes with CPUs: ``cpus_per_task`` = the smallest node's CPUs (a task fills a
    node), ``slots`` = how many such tasks run at once, ``memory`` = the largest node's Ray
    memory resource (bytes)."""
    res = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    res = [r for r in res if r.get("CPU", 0) >= 1]
    if not res:
        raise InvalidArgumentError("the Ray cluster has no alive node with a CPU")
    cpus = min(int(r["CPU"]) for r in res)
    return Cluster(nodes=len(res), cpus_per_task=cpus,
                   slots=sum(int(r["CPU"]) // cpus for r in res),
                   memory=max(int(r.get("memory", 0)) for r in res))


def task_options(cl: Cluster, memory: int, **kw: Any) -> dict[str, Any]:
    """Ray options of a layerscope task: ``num_cpus`` = the smallest node's CPUs (its Rust
    threads set to that many; one runtime environment for every task, so that they share
    workers), ``memory`` = its peak bytes, retried ``MAX_RETRIES`` times when its worker or
    node dies, never on its own error."""
    return {"num_cpus": cl.cpus_per_task, "memory": max(int(memory), 1),
            "max_retries": MAX_RETRIES, "retry_exceptions": False,
            "runtime_env": {"env_vars": {"RAYON_NUM_THREADS": str(cl.cpus_per_task)}}, **kw}


def _can_run(ray: Any, cpus: int, memory: int, gpus: int = 0) -> bool:
    """Whether some alive node has ``cpus`` CPUs, ``memory`` bytes of Ray memory and
    ``gpus`` GPUs."""
    for n in ray.nodes():
        r = n.get("Resources", {}) if n.get("Alive") else {}
        if r.get("CPU", 0) >= cpus and (not memory or r.get("memory", 0) >= memory) \
                and r.get("GPU", 0) >= gpus:
            return True
    return False


class _Watchdog:
    """The no-node watchdog of :func:`wait_all` and :func:`fetch`: ``idle()`` after each
    look that found nothing finished raises :class:`~layerscope.errors.ClusterError` once no
    alive node could run a task (``cpus`` CPUs, ``memory`` bytes) for ``NO_NODE_SECONDS``."""

    def __init__(self, ray: Any, cpus: int, memory: int, gpus: int = 0) -> None:
        self.ray, self.cpus, self.memory, self.gpus = ray, cpus, memory, gpus
        self.lost: float | None = None

    def idle(self, unfinished: str) -> None:
        ray = self.ray
        if _can_run(ray, self.cpus, self.memory, self.gpus):
            self.lost = None
            return
        now = time.monotonic()
        self.lost = now if self.lost is None else self.lost
        if now - self.lost >= NO_NODE_SECONDS:
            alive = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
            raise ClusterError(
                f"no alive Ray node can run this job's tasks (each needs {self.cpus} CPUs"
                + (f", {self.gpus} GPU" if self.gpus else "")
                + f" and {self.memory} bytes) for {NO_NODE_SECONDS:g} s: {unfinished}; alive "
                "nodes: "
                + (", ".join(f"{int(r.get('CPU', 0))} CPUs / {int(r.get('GPU', 0))} GPUs / "
                             f"{int(r.get('memory', 0))} bytes" for r in alive) or "none")
                + ". Add nodes (ray start --address=...) and run it again.")


def wait_all(ray: Any, refs: Sequence[Any], progress: Any, label: str, *, cpus: int,
             memory: int, gpus: int = 0) -> None:
    """Block until every task of ``refs`` has finished (or failed), reporting ``(done,
    total)``. A watchdog looks at the cluster whenever nothing finishes for
    ``POLL_SECONDS``: when no alive node could run a task (``cpus`` CPUs, ``memory``
    bytes) for ``NO_NODE_SECONDS``, :class:`~layerscope.errors.ClusterError` — a job never
    hangs on a cluster that lost its nodes."""
    pending = list(refs)
    total = len(pending)
    dog = _Watchdog(ray, cpus, memory, gpus)
    with Progress(progress, label, unit="task") as prog:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=POLL_SECONDS,
                                     fetch_local=False)
            if done:
                dog.lost = None
                if prog.cb is not None:
                    prog.cb(total - len(pending), total)
                continue
            dog.idle(f"{len(pending)} of {total} tasks unfinished")


def fetch(ray: Any, ref: Any, *, cpus: int, memory: int, gpus: int = 0) -> Any:
    """``ray.get`` of one task's result, under the watchdog of :func:`wait_all` (a result
    whose node died is recomputed from its lineage, which needs a node that can run its
    tasks: ``cpus`` CPUs, ``memory`` bytes). The get runs whole in a helper thread while this
    one watches: a ``ray.get`` that times out drops a transfer under way (Ray aborts the
    partly received object), so it is never timed out; when the watchdog gives up, the
    helper is left blocked (a daemon thread; it ends with the Ray session). A task's own
    error (a layerscope error: non-finite values, a store missing on a node, a budget) is
    raised as itself, also when it reached this task through an input; a result lost more
    than ``MAX_RETRIES`` times (its worker or node died) as
    :class:`~layerscope.errors.ClusterError`."""
    box: dict[str, Any] = {}

    def get() -> None:
        try:
            box["value"] = ray.get(ref)
        except BaseException as e:  # noqa: BLE001 - handed to the watching thread
            box["error"] = e

    helper = threading.Thread(target=get, name="layerscope-ray-get", daemon=True)
    helper.start()
    dog = _Watchdog(ray, cpus, memory, gpus)
    while True:
        helper.join(POLL_SECONDS)
        if not helper.is_alive():
            break
        dog.idle("a result not yet computed")
    if "error" not in box:
        return box["value"]
    cause: BaseException = box["error"]
    if not isinstance(cause, ray.exceptions.RayError):
        raise cause
    while isinstance(cause, ray.exceptions.RayTaskError) and isinstance(
            getattr(cause, "cause", None), BaseException):
        cause = cause.cause
    if not isinstance(cause, ray.exceptions.RayError):
        raise cause from None
    first = next((line for line in _plain(str(cause)).splitlines() if line.strip()), "")
    raise ClusterError(
        f"a Ray task's result was lost and could not be recomputed within {MAX_RETRIES} "
        f"retries ({type(cause).__name__}: {first}): its worker or node died; run it again "
        "on a healthy cluster") from None


def _plain(text: str) -> str:
    """``text`` without terminal colour codes (Ray colours its task names)."""
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


class Part(NamedTuple):
    """One source of a task, as it travels: a store (its path and manifest fingerprint) or
    in-memory arrays (an object-store reference), and the selected layers."""

    path: str | None
    fingerprint: str | None
    arrays: Any
    layers: tuple[str, ...]
    verify: bool = False


def part_of(ray: Any, src: Source, layers: Sequence[str]) -> Part:
    if src.is_store:
        return Part(str(src.store.path.resolve()), src.store.fingerprint(), None, tuple(layers),
                    src.store.verified)
    assert src.arrays is not None
    return Part(None, None, ray.put({x: src.arrays[x] for x in layers}), tuple(layers))


def where() -> str:
    """This process's node, for error messages."""
    try:
        import ray

        node = ray.get_runtime_context().get_node_id()[:12]
    except Exception:  # noqa: BLE001 - only a label
        node = "?"
    return f"node {socket.gethostname()} ({node})"


def open_source(p: Part) -> Source:
    """A task's source, opened where it runs; a store that is missing or different there
    (another manifest fingerprint) is an error naming this node."""
    from .store import open_store

    if p.path is None:
        import ray

        return Source(arrays=ray.get(p.arrays))
    try:
        st = open_store(p.path, verify=p.verify)
    except LayerscopeError as e:
        raise type(e)(f"{where()}: {e} (every node must see the store at the same "
                      "path: shared storage)") from None
    fp = st.fingerprint()
    if fp != p.fingerprint:
        raise MismatchError(
            f"{where()} sees a different store at {p.path}: manifest SHA-256 "
            f"{fp[:16]}…, the driver's {str(p.fingerprint)[:16]}… (every node must read "
            "the same store, e.g. on shared storage)")
    return Source(store=st)


def open_parts(parts: Sequence[Part]) -> list[Any]:
    """The native parts of a task's sources, opened where it runs (:func:`open_source`)."""
    return [native_part(open_source(p), p.layers) for p in parts]


def run_tile(plan: Any, names: list[str], parts: list[Part], t: int, start: int, stop: int,
             shift: Any, check_finite: bool, max_memory: int | None) -> bytes:
    """One task: tile ``t`` over rows ``[start, stop)`` (see the module docs)."""
    return bytes(plan.run_tile(open_parts(parts), names, t, start, stop, shift=shift,
                               check_finite=check_finite, max_memory=max_memory))


class RayDevice(NamedTuple):
    """``device=`` on Ray: the kind of device every tile task runs its products on —
    ``"cuda"`` (each task asks Ray for one GPU, ``num_gpus=1``, and uses the one Ray gives
    it) or ``"cpu"`` (the torch engine on the node's CPUs)."""

    type: str

    def __str__(self) -> str:
        return f"{self.type} (on the Ray nodes)"


def ray_device(device: Any) -> RayDevice:
    """``device=`` with ``backend="ray"``: ``"cuda"``, ``"cpu"`` or ``"auto"`` (CUDA when the
    cluster has GPUs: decided when the pass starts), or such a torch device without an index
    — Ray, not the caller, picks each task's GPU."""
    text = str(device).strip()
    if text in ("cuda", "cpu", "auto"):
        return RayDevice(text)
    raise InvalidArgumentError(
        f"device={device!r} with backend='ray': Ray assigns a GPU to each task, so pass "
        "device='cuda' (a GPU per task), 'cpu' (the torch engine on the nodes' CPUs) or "
        "'auto'")


def run_tile_device(plan: Any, names: list[str], parts: list[Part], t: int, start: int,
                    stop: int, shift: Any, check_finite: bool, device: str,
                    compute: str) -> bytes:
    """One task on a device: tile ``t`` over rows ``[start, stop)`` with the products on the
    torch engine (:func:`layerscope._device.passes.run_tile`: the same partial as :func:`run_tile`'s,
    to rounding). ``"cuda"``: the GPU Ray assigned to this task (the first it sees)."""
    from ._device.devices import device_budget, oom_as_budget_error, precision, torch_module
    from ._device.feed import _Layers
    from ._device.passes import _tile_block_rows, run_tile

    torch = torch_module()
    if device == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError(f"{where()}: torch sees no CUDA device in this task")
        dev = torch.device("cuda", 0)
    else:
        dev = torch.device(device)
    srcs = [open_source(p) for p in parts]
    layers = _Layers([(s, list(p.layers)) for s, p in zip(srcs, parts)])
    nparts = [native_part(s, p.layers) for s, p in zip(srcs, parts)]
    budget, source = device_budget(dev)
    dims = [int(d) for d in plan.dims]
    n = int(srcs[0].num_rows)
    with oom_as_budget_error(torch, dev, budget, f"{where()}, {source}"), \
            precision(torch, compute), torch.no_grad():
        br = _tile_block_rows(plan, t, dims, stop - start, dev, budget)
        return bytes(run_tile(
            torch, dev, plan, layers, nparts, t, n, compute=compute,
            check_finite=check_finite, block_rows=br, rows=(start, stop), shift=shift))


def merge(a: bytes, b: bytes) -> bytes:
    """One merge task: ``b``'s rows after ``a``'s."""
    return bytes(_native.merge_partials(a, b))


_REMOTE: dict[Any, Any] = {}


def remote(ray: Any, fn: Any) -> Any:
    """``fn`` as a Ray remote function, made once per process."""
    if fn not in _REMOTE:
        _REMOTE[fn] = ray.remote(fn)
    return _REMOTE[fn]


def _remote(ray: Any, name: str) -> Any:
    return remote(ray, {"tile": run_tile, "merge": merge, "device": run_tile_device}[name])


def row_ranges(src: Source, n: int, k: int) -> list[tuple[int, int]]:
    """``k`` contiguous ranges of near-equal row counts covering ``[0, n)`` (each task's
    work is proportional to its rows); a cut is moved to a shard boundary of a store when
    one lies within 1/16 of a range of it (a task then reads whole shards)."""
    k = max(1, min(int(k), n))
    starts: list[int] = []
    if src.is_store:
        starts = sorted({int(s["start_row"]) for s in src.store.shards} - {0})
    edges = [0]
    for i in range(1, k):
        target = i * n // k
        near = min(starts, key=lambda s: abs(s - target), default=None)
        cut = near if near is not None and abs(near - target) * 16 <= n / k else target
        edges.append(max(cut, edges[-1]))
    edges.append(n)
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


class Job(NamedTuple):
    """One plan over some sources: ``parts`` as (source, layers)."""

    plan: Any
    parts: list[tuple[Source, list[str]]]
    names: list[str]


class Run:
    """The tasks of some jobs on one cluster (submitted at once), merged per tile."""

    def __init__(self, ray: Any, jobs: Sequence[Job], *, check_finite: bool,
                 max_memory: int | None, device: RayDevice | None = None,
                 compute: str | None = None) -> None:
        self.ray = ray
        self.cl = cluster(ray)
        self.device = device
        self.compute = compute
        self.gpus = 1 if device is not None and device.type == "cuda" else 0
        n = int(jobs[0].parts[0][0].num_rows)
        self.n = n
        tiles = sum(int(j.plan.tiles) for j in jobs)
        for j in jobs:
            for t in range(int(j.plan.tiles)):
                need = int(j.plan.tile_peak_bytes(t))
                if self.cl.memory and need > self.cl.memory:
                    raise MemoryBudgetError(
                        f"a task of this plan needs {need} bytes, more than the Ray memory "
                        f"of any node ({self.cl.memory} bytes); plan it under a smaller "
                        "max_memory so that its tiles fit a node")
        per_tile = math.ceil(self.cl.slots * TASKS_PER_SLOT / max(tiles, 1))
        per_tile = max(1, min(per_tile, n // MIN_TASK_ROWS))
        tile_fn = _remote(ray, "tile" if device is None else "device")
        merge_fn = _remote(ray, "merge")
        self.leaves: list[Any] = []
        self.roots: list[list[list[Any]]] = []
        self.merges = 0
        self.driver_merges = 0
        self.depth = 0
        self.ranges = per_tile
        self.memory = 0
        for j in jobs:
            native = [native_part(src, ls) for src, ls in j.parts]
            specs = [part_of(ray, src, ls) for src, ls in j.parts]
            ranges = row_ranges(j.parts[0][0], n, per_tile)
            roots = []
            for t in range(int(j.plan.tiles)):
                shift = j.plan.tile_shift(native, t)
                # Without a finite sampled shift each range would take its own first-block
                # means: cross sums of different shifts do not add, so one range.
                rs = ranges if shift is not None else [(0, n)]
                mem = int(j.plan.tile_peak_bytes(t))
                self.memory = max(self.memory, mem)
                if device is None:
                    fn = tile_fn.options(**task_options(self.cl, mem))
                    refs = [fn.remote(j.plan, j.names, specs, t, a, b, shift, check_finite,
                                      max_memory) for a, b in rs]
                else:
                    fn = tile_fn.options(**task_options(self.cl, mem, num_gpus=self.gpus))
                    refs = [fn.remote(j.plan, j.names, specs, t, a, b, shift, check_finite,
                                      device.type, compute or str(j.plan.compute))
                            for a, b in rs]
                self.leaves.extend(refs)
                mfn = merge_fn.options(**task_options(
                    self.cl, min(2 * mem, self.cl.memory or 2 * mem), num_cpus=1))
                roots.append(self._tree(mfn, refs))
            self.roots.append(roots)

    def _tree(self, fn: Any, refs: list[Any]) -> list[Any]:
        """Merge tasks over adjacent pairs, level by level, down to the two halves of the
        root (merged on the driver as they arrive: one transfer of the largest partial
        less)."""
        depth = 1 if len(refs) > 1 else 0
        while len(refs) > 2:
            nxt = [fn.remote(refs[i], refs[i + 1]) for i in range(0, len(refs) - 1, 2)]
            self.merges += len(nxt)
            if len(refs) % 2:
                nxt.append(refs[-1])
            refs = nxt
            depth += 1
        self.depth = max(self.depth, depth)
        self.driver_merges += len(refs) - 1
        return refs

    def all_refs(self) -> list[Any]:
        return self.leaves + [r for rs in self.roots for tile in rs for r in tile]

    def wait_leaves(self, progress: Any) -> None:
        """Block until every range task has finished (:func:`wait_all`)."""
        wait_all(self.ray, self.leaves, progress, "ray tasks", cpus=self.cl.cpus_per_task,
                 memory=self.memory, gpus=self.gpus)

    def get(self, refs: list[Any]) -> bytes:
        """A tile's merged bytes (the root's two halves merged here, GIL released); errors
        as :func:`fetch` raises them."""
        need = {"cpus": self.cl.cpus_per_task, "memory": self.memory, "gpus": self.gpus}
        out = fetch(self.ray, refs[0], **need)
        for ref in refs[1:]:
            out = _native.merge_partials(out, fetch(self.ray, ref, **need))
        return bytes(out)

    def meta(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.device is not None:
            extra = {"device": str(self.device), "engine_products": "torch"}
            if self.compute == "tf32":
                from ._device.devices import TF32_APPROXIMATION

                extra["approximation"] = TF32_APPROXIMATION
        return {
            **extra,
            "backend": "ray",
            "tasks": {"ranges": len(self.leaves), "merges": self.merges,
                      "driver_merges": self.driver_merges,
                      "ranges_per_tile": self.ranges, "merge_depth": self.depth,
                      "nodes": self.cl.nodes, "cpus_per_task": self.cl.cpus_per_task,
                      "gpus_per_task": self.gpus,
                      "merge_order": "adjacent row ranges, balanced binary tree, the root's "
                                     "two halves merged on the driver"},
        }


def _running(ray: Any, jobs: Sequence[Job], progress: Any, *, check_finite: bool,
             max_memory: int | None, device: RayDevice | None = None,
             compute: str | None = None) -> Iterator[tuple[Run, int, list[bytes]]]:
    """Submit every job's tasks, then yield ``(run, job index, merged tile bytes)`` job by
    job, in order.

    Nothing is cancelled with ``ray.cancel``: a cancel that races a task's completion aborts
    the driver's whole process in Ray (``Check failed: ... Tried to complete task that was
    not pending``, ray-project/ray#54527; seen here with Ray 2.60). On an error the tasks
    already submitted run to the end of their row range (each is bounded) and their results
    are dropped; Ctrl-C in a session layerscope started shuts that session down (its
    workers with it), in a session of the user's the driver stops waiting and says so."""
    run = Run(ray, jobs, check_finite=check_finite, max_memory=max_memory, device=device,
              compute=compute)
    try:
        run.wait_leaves(progress)
        for k, roots in enumerate(run.roots):
            yield run, k, [run.get(r) for r in roots]
    except KeyboardInterrupt:
        stop(ray)
        raise


def stop(ray: Any) -> None:
    """After Ctrl-C: shut down a session that :func:`connect` started (its workers stop
    with it; the next call starts a new one); a session of the user's is left running."""
    if ray.is_initialized() and _OWNED["job"] is not None and _job(ray) == _OWNED["job"]:
        ray.shutdown(wait_for_processes=True)  # gone before a next call starts a session
        _OWNED["job"] = None
    else:
        warnings.warn("interrupted: the Ray tasks already submitted run to the end of their "
                      "row range on the user's cluster (their results are dropped)",
                      RuntimeWarning, stacklevel=3)


def _cluster_device(ray: Any, device: RayDevice | None) -> RayDevice | None:
    """``device`` against the cluster: ``"auto"`` is CUDA when an alive node has a GPU (else
    the Rust engine); ``"cuda"`` without one is an error, not tasks that never start."""
    if device is None:
        return None
    gpus = sum(float(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes()
               if n.get("Alive"))
    if device.type == "auto":
        return RayDevice("cuda") if gpus >= 1 else None
    if device.type == "cuda" and gpus < 1:
        raise InvalidArgumentError(
            "device='cuda' with backend='ray': no alive node of the cluster has a GPU (Ray's "
            "GPU resource); use device='cpu', 'auto' or None")
    return device


def pair_stats(parts: list[tuple[Source, list[str]]], names: list[str], num_a: int, *,
               block_rows: int | None, check_finite: bool, max_memory: int | None,
               progress: Any, compute: str, strategy: str | None,
               address: str | None, device: RayDevice | None = None,
               ) -> tuple[Any, dict[str, Any]]:
    """``_native.pair_pass`` on Ray: ``(PairStats, meta)`` (``meta``: backend, tasks).
    ``device``: each tile task's products on the torch engine on that kind of device (one
    GPU per task for ``"cuda"``); the Gram route runs on the driver's CPU."""
    ray = connect(address)
    device = _cluster_device(ray, device)
    dims = [src.dims[x] for src, ls in parts for x in ls]
    n = int(parts[0][0].num_rows)
    dev_compute = compute
    compute = "float32" if compute == "tf32" else compute
    plan = _native.pair_plan(dims, num_a, n, block_rows, compute, max_memory, strategy)["tiles"]
    if plan is None:  # the Gram route: every row of a layer at once, on the driver
        with Progress(progress, "moments") as prog:
            st = _native.pair_pass([native_part(src, ls) for src, ls in parts], names, num_a,
                                   block_rows=block_rows, check_finite=check_finite,
                                   max_memory=max_memory, progress=prog.cb, compute=compute,
                                   strategy="gram")
        return st, {"backend": "ray", "tasks": {
            "ranges": 0, "merges": 0, "note": "the Gram route (every row of a layer at "
            "once) ran on the driver"}}
    out = _native.PairStatsBuilder(plan, names, n)
    runs = _running(ray, [Job(plan, parts, names)], progress, check_finite=check_finite,
                    max_memory=max_memory, device=device, compute=dev_compute)
    run, _, tiles = next(runs)
    runs.close()
    for t, data in enumerate(tiles):
        out.add(t, data)
    return out.finish(), run.meta()


def moment_passes(jobs: list[tuple[list[tuple[Source, list[str]]], int]], *, compute: str,
                  check_finite: bool, max_memory: int | None, progress: Any,
                  address: str | None, device: RayDevice | None = None,
                  ) -> Iterator[tuple[Any, dict[str, Any]]]:
    """One single-pass moment job per ``(parts, num_a)`` on Ray, all submitted at once;
    yields ``(Moments, meta)`` per job in order, as :func:`layerscope._moments.compute_moments`
    returns them (``meta`` also has backend and tasks). ``device``: as :func:`pair_stats`."""
    from ._moments import single_pass_meta

    ray = connect(address)
    device = _cluster_device(ray, device)
    dev_compute = compute
    compute = "float32" if compute == "tf32" else compute
    planned = []
    for parts, num_a in jobs:
        dims = [src.dims[x] for src, ls in parts for x in ls]
        n = int(parts[0][0].num_rows)
        plan = _native.TilePlan.single(dims, num_a, n, None, compute)
        planned.append(Job(plan, parts, [x for _, ls in parts for x in ls]))
    t0 = time.perf_counter()
    for run, k, tiles in _running(ray, planned, progress, check_finite=check_finite,
                                  max_memory=max_memory, device=device, compute=dev_compute):
        job = planned[k]
        m = _native.MomentAccumulator.from_bytes(tiles[0]).finalize(jobs[k][1])
        meta = single_pass_meta(m, job.parts, job.names, job.plan.compute, t0,
                                job.plan.block_rows, job.plan.peak_bytes)
        meta.update(engine="ray", **run.meta())
        yield m, meta
