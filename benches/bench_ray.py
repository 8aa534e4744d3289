"""``layerscope.cka(..., backend="ray")`` on a local Ray cluster against the local run, and
the arithmetic of a 7-8B job on 8 and 64 nodes.

Data (default; ``--quick`` shrinks it): a bf16 store of L = 13 layers × 768 over n = 32 768
rows (MiniLM/BERT-base-sized), per-feature offsets like LLM activations; the job: linear CKA
of every layer pair (biased and debiased, float32 arithmetic as ``compute="auto"`` picks for
bf16).

* ``local``: ``layerscope.cka(store)`` — the Rust pass on this machine's two cores.
* ``ray``: a head node (no CPUs) and two one-CPU worker nodes (``ray.cluster_utils.Cluster``)
  on this machine, ``layerscope.cka(store, backend="ray")``: range tasks of one thread each,
  merged by a task. ``cold`` is the first call (worker processes start), ``warm`` the best of
  ``--repeat`` later calls. The overhead goal is ``warm / local <= 1.2``.
* ``start-up``: starting the cluster, ``ray.init`` and a first trivial task.

Peak memory: the sum of the resident sets of this process and every Ray process (those whose
command line names the cluster's temp dir), sampled every 20 ms — pages of Ray's shared
object store count in each process that maps them, so this is an upper bound.

The cluster binds 127.0.0.1 only: the bench re-executes itself inside a network namespace of
its own (``unshare -n``, loopback up; needs root) and stops every Ray process it started.

The simulated scale-out table plans the 10⁶-row bf16 all-pairs CKA of a 7-8B model's
residual stream (33 × 4096) and of a 70B model's (80 × 8192) for nodes of 32 cores and
128 GiB, under task budgets of 100 and 25 GiB, on 8 and 64 nodes, and counts what
``backend="ray"`` would submit: tiles, range tasks, merge tasks (the driver merges each
tile's last two halves), merge depth, bytes read from the store, bytes moved (every task's
serialised partial sums, once) and the compute time at
this machine's measured float32 product rate per core × 32 per node, in waves of one task
per node. Nothing of it runs.

    python benches/bench_ray.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import gemm_rates, roofline_line  # noqa: E402


class RssSampler:
    """Peak of the summed RSS of this process and every process whose command line contains
    ``tag`` (sampled every ``every`` seconds in a thread)."""

    def __init__(self, tag: str, every: float = 0.02) -> None:
        self.tag, self.every = tag, every
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _pids(self) -> list[int]:
        out = [os.getpid()]
        for pid in os.listdir("/proc"):
            if pid.isdigit() and int(pid) != os.getpid():
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if self.tag.encode() in cmd:
                    out.append(int(pid))
        return out

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        pids = self._pids()
        last = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - last > 0.5:  # new worker processes
                pids, last = self._pids(), time.monotonic()
            self.peak = max(self.peak, sum(self._rss(p) for p in pids))
            time.sleep(self.every)

    def __enter__(self) -> RssSampler:
        self.peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop.clear()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _store(path: str, n: int, layers: int, d: int) -> None:
    import layerscope

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    arrays = {}
    for li in range(layers):
        w = rng.standard_normal((d, d)).astype(np.float32) / d**0.5
        x = np.tanh(x @ w) + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
        arrays[f"layer.{li}"] = x + 20.0 * rng.standard_normal(d).astype(np.float32)
    layerscope.write_store(path, arrays, dtype="bfloat16")


def _partial_bytes(plan: Any) -> list[int]:
    """Serialised partial sums of each tile of a TilePlan (the accumulator's byte format:
    a diagonal tile's upper triangle of ``(D+L)²``, a cross tile's sums in full)."""
    js = json.loads(plan.to_json())[1]
    width = [p["cols"]["end"] - p["cols"]["start"] for p in js["pieces"]]
    out = []
    for t in js["tiles"]:
        if "Diag" in t:
            g = js["groups"][t["Diag"]]
            d, lc = sum(width[p] for p in g), len(g)
            dz = d + lc
            out.append(8 * (dz * (dz + 1) // 2 + dz + d))
        else:
            ga, gb = (js["groups"][i] for i in t["Cross"])
            da, db = sum(width[p] for p in ga), sum(width[p] for p in gb)
            la, lb = len(ga), len(gb)
            out.append(8 * (da * db + da * lb + la * db + la * lb + 2 * (da + db) + la + lb))
    return out


def scale_out(rate_per_core: float) -> None:
    from layerscope import _native

    n = 10**6
    print(f"\nsimulated: all-pairs linear CKA over n = 10^6 bf16 rows on nodes of 32 cores / "
          f"128 GiB; compute at {rate_per_core * 32 / 1e9:.0f} G multiply-adds/s per node "
          "(this machine's float32 rate per core x 32); net h: every byte moved through one "
          "10 Gbit/s link (an upper bound: merges run on many nodes at once)")
    print(f"{'model':>13s} {'budget':>7s} {'nodes':>5s} {'tiles':>5s} {'ranges/tile':>11s} "
          f"{'tasks':>6s} {'merges':>6s} {'depth':>5s} {'read GiB':>8s} {'moved GiB':>9s} "
          f"{'compute h':>9s} {'net h':>6s}")
    for name, layers, d in (("7-8B 33x4096", 33, 4096), ("70B 80x8192", 80, 8192)):
        dims = [d] * layers
        for budget_gib in (100, 25):
            plan = _native.pair_plan(dims, layers, n, None, "float32", budget_gib * 2**30,
                                     None)["tiles"]
            assert plan is not None
            tiles = int(plan.tiles)
            part = _partial_bytes(plan)
            madds = int(plan.madds_per_row) * n
            read = sum(int(r) * n * w * 2 for r, w in zip(plan.layer_reads, dims))
            for nodes in (8, 64):
                per = max(1, min(math.ceil(nodes / tiles), n // 1024))
                # range results, then merge-task results (the root's two halves merged on
                # the driver): every result crosses the network once
                results = per + max(per - 2, 0)
                moved = sum(p * results for p in part)
                depth = math.ceil(math.log2(per)) if per > 1 else 0
                waves = math.ceil(tiles * per / nodes)  # a task: 1/per of a tile, one node
                secs = waves * madds / tiles / per / (rate_per_core * 32)
                print(f"{name:>13s} {budget_gib:>3d} GiB {nodes:5d} {tiles:5d} {per:11d} "
                      f"{tiles * per:6d} {tiles * max(per - 2, 0):6d} {depth:5d} "
                      f"{read / 2**30:8.0f} {moved / 2**30:9.0f} {secs / 3600:9.2f} "
                      f"{moved / (10e9 / 8) / 3600:6.2f}")


def run(args: argparse.Namespace) -> None:
    import layerscope
    import ray
    from layerscope import _native
    from ray.cluster_utils import Cluster

    n, layers, d = (8192, 6, 256) if args.quick else (32768, 13, 768)
    tmp = tempfile.mkdtemp(prefix="lsbr")
    tag = os.path.join(tmp, "ray")
    try:
        store = os.path.join(tmp, "store")
        _store(store, n, layers, d)
        plan = layerscope.plan(store)
        dgemm, sgemm = gemm_rates()
        print(f"bf16 store of {layers} x {d}, n = {n}; all-pairs linear CKA: {plan.strategy}, "
              f"{plan.flops / 1e9:.0f} GFLOP; numpy sgemm {sgemm:.0f} GFLOP/s, dgemm "
              f"{dgemm:.0f} GFLOP/s in this run")
        rows = []
        with RssSampler(tag) as mem:
            t = time.perf_counter()
            local = layerscope.cka(store, progress=False)
            rows.append(("local (2 threads)", time.perf_counter() - t, mem))
        for _ in range(args.repeat - 1):
            t = time.perf_counter()
            layerscope.cka(store, progress=False)
            rows[0] = ("local (2 threads)", min(rows[0][1], time.perf_counter() - t), mem)
        local_mem = mem.peak
        t0 = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "temp_dir": tag})
        try:
            for _ in range(2):  # an object store that holds a few partial sums
                cluster.add_node(num_cpus=1, object_store_memory=2 << 30)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            ray.get(ray.remote(lambda: 1).remote())
            start = time.perf_counter() - t0
            with RssSampler(tag) as mem:
                t = time.perf_counter()
                res = layerscope.cka(store, progress=False, backend="ray")
                cold = time.perf_counter() - t
            cold_mem = mem.peak
            warm, warm_mem = math.inf, 0
            for _ in range(args.repeat):
                with RssSampler(tag) as mem:
                    t = time.perf_counter()
                    res = layerscope.cka(store, progress=False, backend="ray")
                    warm = min(warm, time.perf_counter() - t)
                warm_mem = max(warm_mem, mem.peak)
            diff = float(np.max(np.abs(res.extra["debiased"] - local.extra["debiased"])))
        finally:
            ray.shutdown()
            cluster.shutdown()
        base = rows[0][1]
        tasks = res.meta["tasks"]
        print(f"ray: {tasks['ranges']} range tasks, {tasks['merges']} merge tasks on "
              f"{tasks['nodes']} one-CPU nodes; max |debiased CKA ray - local| = {diff:.1e}; "
              f"start-up (cluster + init + first task) {start:.1f} s")
        print(f"{'contender':24s} {'seconds':>8s} {'vs local':>8s} {'GFLOP/s':>8s} "
              f"{'of sgemm':>8s} {'peak MiB':>9s}")
        for name, sec, peak in (("local (2 threads)", base, local_mem),
                                ("ray, cold (first call)", cold, cold_mem),
                                ("ray, warm", warm, warm_mem)):
            rate = plan.flops / sec / 1e9
            print(f"{name:24s} {sec:8.2f} {sec / base:7.2f}x {rate:8.1f} {rate / sgemm:8.0%} "
                  f"{peak / 2**20:9.0f}")
        print(roofline_line(dgemm, sgemm, {"local": (plan.flops / base / 1e9, "f32"),
                                           "ray, warm": (plan.flops / warm / 1e9, "f32")}))
        scale_out(float(_native.measured_madds_per_s("float32")) / (os.cpu_count() or 1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small data (about 30 s)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs (fastest kept)")
    ap.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        import ray  # noqa: F401
    except ImportError:
        print("bench_ray: skipped (ray is not installed: pip install 'layerscope[ray]')")
        return
    if not args.in_netns:
        cmd = ["unshare", "-n", "bash", "-c", 'ip link set lo up && exec "$0" "$@"',
               sys.executable, os.path.abspath(__file__), "--in-netns",
               "--repeat", str(args.repeat)] + (["--quick"] if args.quick else [])
        try:
            rc = subprocess.run(cmd, env={**os.environ, "RAY_ADDRESS": ""}).returncode
        except FileNotFoundError:
            rc = 127
        if rc:
            print(f"bench_ray: failed or skipped (exit {rc}; the cluster needs a network "
                  "namespace of its own: unshare -n, as root)")
        return
    run(args)


if __name__ == "__main__":
    main()
