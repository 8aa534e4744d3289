"""The Ray checks of ``tests/test_ray.py``, run by it inside a network namespace of its own
(``unshare -n``: only 127.0.0.1 exists, so no Ray process can bind or reach anything else).

A cluster of a head (no CPUs: it schedules nothing) and two one-CPU worker nodes
(``ray.cluster_utils.Cluster``), every Ray-backed measure against the local one on the same
data, the errors a node gives, then the cluster is shut down. Writes ``{case: {...}}`` as
JSON to ``argv[1]`` after every case (atomically), with ``_running`` naming the case under
way, so a run stopped from outside still says what finished and where it stood; a case that
raised records ``error`` and its traceback. A case still running after ``CASE_SECONDS`` has
the stacks of every thread printed to stderr (and again every ``CASE_SECONDS``). Usage:
``python tests/ray_checks.py OUT.json RAY_TEMP_DIR``.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np


def _offsets(rng: np.random.Generator, n: int, d: int, offset: float) -> np.ndarray:
    """LLM-like activations: a shared low-rank part, noise, and per-feature mean offsets
    ``offset`` times the spread."""
    z = rng.standard_normal((n, 4))
    x = z @ rng.standard_normal((4, d)) + 0.5 * rng.standard_normal((n, d))
    return x + offset * rng.standard_normal(d)


def _diff(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    both = np.isnan(a) & np.isnan(b)
    return float(np.max(np.abs(np.where(both, 0.0, a - b)), initial=0.0))


def _numbers(x: Any) -> list[float]:
    """Every number in a JSON value, in order (None: NaN; strings left out)."""
    if isinstance(x, dict):
        return [v for k in x for v in _numbers(x[k])]
    if isinstance(x, list):
        return [v for item in x for v in _numbers(item)]
    if x is None:
        return [float("nan")]
    return [float(x)] if isinstance(x, (int, float)) else []


#: Seconds a case may run before the stacks of every thread are printed (none takes 30).
CASE_SECONDS = 90


def _save(out: str, results: dict[str, Any]) -> None:
    tmp = f"{out}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(tmp, out)


def main(out: str, temp_dir: str) -> None:
    import layerscope as ls
    import ray
    from layerscope import _moments, _native, _ray
    from layerscope.cli import main as cli
    from layerscope.errors import InvalidArgumentError
    from ray.cluster_utils import Cluster

    # up to 12 range tasks per wave: 5 ranges of a single-pass tile (a merge tree of depth
    # 3, one range left over at each level), 2 per tile of a 6-tile plan
    _ray.TASKS_PER_SLOT = 6
    results: dict[str, Any] = {}
    tmp = tempfile.mkdtemp(prefix="lsray-data")
    rng = np.random.default_rng(31)
    n = 6000

    def case(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        results["_running"] = name
        _save(out, results)
        print(f"ray_checks: case {name} starts", file=sys.stderr, flush=True)
        faulthandler.dump_traceback_later(CASE_SECONDS, repeat=True, file=sys.stderr)
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except BaseException as e:  # noqa: BLE001 - recorded for the test to report
            results[name] = {"error": f"{type(e).__name__}: {e}",
                             "trace": traceback.format_exc()}
        finally:
            faulthandler.cancel_dump_traceback_later()
        print(f"ray_checks: case {name} took {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)
        del results["_running"]
        _save(out, results)

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "temp_dir": temp_dir})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)

        dims = [40, 300, 7, 129]
        x64 = {f"l{i}": _offsets(rng, n, d, 300.0 if i % 2 == 0 else 0.0)
               for i, d in enumerate(dims)}
        s64 = f"{tmp}/f64"
        ls.write_store(s64, x64, dtype="float64", shard_bytes=1 << 20)
        rot = {f"m{i}": np.tanh(x64[f"l{i}"][:, : max(4, d // 2)] / 50.0)
               + 0.1 * rng.standard_normal((n, max(4, d // 2))) for i, d in enumerate(dims)}
        s64b = f"{tmp}/f64b"
        ls.write_store(s64b, rot, dtype="float64", shard_bytes=1 << 20)
        bf = {f"h{i}": _offsets(rng, n, d, 200.0) for i, d in enumerate([64, 96, 32])}
        sbf = f"{tmp}/bf16"
        ls.write_store(sbf, bf, dtype="bfloat16", shard_bytes=256 << 10)

        def cka_pair(src: Any, other: Any = None, tol: float = 1e-10, **kw: Any) -> dict:
            loc = ls.cka(src, other, progress=False, **kw)
            rem = ls.cka(src, other, progress=False, backend="ray", **kw)
            return {"diff": max(_diff(loc.extra[e], rem.extra[e])
                                for e in ("biased", "debiased")),
                    "tol": tol, "tasks": rem.meta.get("tasks"), "backend": rem.meta["backend"],
                    "strategy": rem.meta["plan"]["strategy"], "passes": rem.meta["plan"]["passes"],
                    "compute": rem.meta["compute"], "n": rem.meta["n"]}

        case("cka_bf16_f32", lambda: cka_pair(sbf, tol=1e-6))
        case("cka_f64", lambda: cka_pair(s64))
        pb = int(_native.pass_bytes(dims, 1024, "float64"))
        case("cka_tiled", lambda: {
            **cka_pair(s64, strategy="tiled", max_memory=int(pb * 0.35)),
            "single_diff": _diff(ls.cka(s64, progress=False).values,
                                 ls.cka(s64, progress=False, backend="ray", strategy="tiled",
                                        max_memory=int(pb * 0.35)).values)})
        case("cka_cross", lambda: cka_pair(s64, s64b))
        case("cka_arrays_sample", lambda: cka_pair(x64, sample=2500, seed=3))

        def spectra() -> dict:
            loc = ls.spectrum(s64, progress=False)
            rem = ls.spectrum(s64, progress=False, backend="ray")
            rel = max(_diff(loc.eigenvalues[k], rem.eigenvalues[k])
                      / float(np.max(loc.eigenvalues[k])) for k in loc.layers)
            return {"diff": rel, "tol": 1e-10, "tasks": rem.meta.get("tasks"),
                    "strategy": rem.meta["plan"]["strategy"]}

        case("spectrum", spectra)

        def align() -> dict:
            # a budget that holds the widest pair's moments at once, not all: layer tiles
            need = _moments.measure_peak([300, 150], n, "float64")
            kw = {"method": "procrustes", "max_memory": int(need * 1.2)}
            loc = ls.alignment(s64, s64b, progress=False, **kw)
            rem = ls.alignment(s64, s64b, progress=False, backend="ray", **kw)
            return {"diff": _diff(loc.values, rem.values), "tol": 1e-10,
                    "strategy": rem.meta["plan"]["strategy"], "tasks": rem.meta.get("tasks")}

        case("alignment_tiles", align)

        def analyze() -> dict:
            kw = {"measures": ["cka", "cka_debiased", "spectrum", "alignment"], "k": 5}
            loc = ls.analyze(s64, progress=False, **kw)
            rem = ls.analyze(s64, progress=False, backend="ray", **kw)
            diffs = {m: _diff(loc[m].values, rem[m].values) for m in ("cka", "cka_debiased",
                                                                       "alignment")}
            diffs["spectrum"] = max(
                _diff(loc["spectrum"].eigenvalues[k], rem["spectrum"].eigenvalues[k])
                / float(np.max(loc["spectrum"].eigenvalues[k])) for k in loc["spectrum"].layers)
            return {"diff": max(diffs.values()), "diffs": diffs, "tol": 1e-10,
                    "tasks": rem["cka"].meta.get("tasks")}

        case("analyze", analyze)

        def on_device() -> dict:
            # the torch engine in each range task (device='cpu': the code a GPU task runs,
            # without num_gpus); tiles, and a single pass of bf16 spectra
            kw = {"strategy": "tiled", "max_memory": int(pb * 0.35)}
            loc = ls.cka(s64, progress=False, **kw)
            rem = ls.cka(s64, progress=False, backend="ray", device="cpu", **kw)
            sl = ls.spectrum(sbf, progress=False)
            sr = ls.spectrum(sbf, progress=False, backend="ray", device="cpu")
            rel = max(_diff(sl.eigenvalues[k], sr.eigenvalues[k])
                      / float(np.max(sl.eigenvalues[k])) for k in sl.layers)
            errors = {}
            for name, call in {
                    "cuda": lambda: ls.cka(s64, progress=False, backend="ray", device="cuda"),
                    "index": lambda: ls.cka(s64, progress=False, backend="ray",
                                            device="cuda:1"),
                    "rbf": lambda: ls.cka(s64, progress=False, backend="ray", device="cpu",
                                          kernel="rbf", sample=300)}.items():
                try:
                    call()
                    errors[name] = "no error"
                except InvalidArgumentError as e:
                    errors[name] = str(e)
            auto = ls.cka(s64, progress=False, backend="ray", device="auto")
            return {"diff": _diff(loc.extra["biased"], rem.extra["biased"]),
                    "diff_debiased": _diff(loc.extra["debiased"], rem.extra["debiased"]),
                    "tol": 1e-10, "spectrum_rel": rel, "tasks": rem.meta["tasks"],
                    "device": rem.meta.get("device"), "spectrum_device": sr.meta.get("device"),
                    "passes": rem.meta["plan"]["passes"], "errors": errors,
                    "auto_device": auto.meta.get("device")}

        case("device_cpu", on_device)

        # the sampled measures: a task per layer, a task per block of pairs; two layers per
        # group, so that a 4-layer store has diagonal and off-diagonal blocks
        from layerscope import _ray_sampled

        _ray_sampled.BLOCK_LAYERS = 2

        def sampled(fn: Callable[..., Any], src: Any, other: Any = None, **kw: Any) -> dict:
            loc = fn(src, other, progress=False, **kw)
            rem = fn(src, other, progress=False, backend="ray", **kw)
            bw = [_diff(list(loc.meta[k].values()), list(rem.meta[k].values()))
                  for k in ("bandwidths_a", "bandwidths_b") if k in loc.meta]
            return {"diff": _diff(loc.values, rem.values), "bw": max(bw, default=0.0),
                    "tasks": rem.meta["tasks"], "backend": rem.meta["backend"],
                    "n": rem.meta["n"], "shape": list(rem.values.shape),
                    "hash": rem.meta["sample_hash"] == loc.meta["sample_hash"]}

        case("rbf", lambda: sampled(ls.cka, s64, kernel="rbf", sample=700, seed=2))
        case("rbf_cross_debiased", lambda: sampled(ls.cka, s64, s64b, kernel="rbf",
                                                   estimator="debiased", sample=700))
        case("rbf_bf16", lambda: sampled(ls.cka, sbf, kernel="rbf", sigma=0.5, sample=600))
        case("rsa", lambda: sampled(ls.rsa, s64, sample=500))
        case("rsa_cross", lambda: sampled(ls.rsa, s64, s64b, sample=400, compare="pearson",
                                          dissimilarity="correlation"))
        case("mutual_knn_arrays", lambda: sampled(ls.mutual_knn, x64, sample=600, k=7))

        def rbf_nan() -> dict:
            bad = dict(x64)
            bad["l2"] = bad["l2"].copy()
            bad["l2"][::50, 3] = np.inf
            snan = f"{tmp}/inf"
            ls.write_store(snan, bad, dtype="float64", shard_bytes=1 << 20)
            out: dict[str, Any] = {}
            for backend in ("local", "ray"):
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    r = ls.cka(snan, kernel="rbf", sample=500, nonfinite="nan", progress=False,
                               backend=backend)
                out[backend] = {"values": r.values.tolist(),
                                "warnings": [str(x.message) for x in w
                                             if "non-finite" in str(x.message)],
                                "rows": r.meta["nonfinite_rows"]}
            out["diff"] = _diff(out["local"]["values"], out["ray"]["values"])
            return out

        case("rbf_nan", rbf_nan)

        def idim() -> dict:
            kw = {"methods": ["twonn", "mle", "gride", "pca"], "sample": 1500, "bootstrap": 20,
                  "k": 8, "scales": [1, 2]}
            loc = ls.intrinsic_dimensions(s64, progress=False, **kw)
            rem = ls.intrinsic_dimensions(s64, progress=False, backend="ray", **kw)
            diffs = {}
            for m in kw["methods"]:
                a, b = loc[m], rem[m]
                assert a.layers == b.layers, (a.layers, b.layers)
                diffs[m] = max(_diff([a.values[x] for x in a.layers],
                                     [b.values[x] for x in b.layers]),
                               _diff([a.ci.get(x, (0, 0)) for x in a.layers],
                                     [b.ci.get(x, (0, 0)) for x in b.layers]),
                               _diff([a.errors.get(x, 0) for x in a.layers],
                                     [b.errors.get(x, 0) for x in b.layers]))
            return {"diffs": diffs, "scales": rem["gride"].scales == loc["gride"].scales,
                    "details": rem["mle"].details == loc["mle"].details,
                    "tasks": rem["twonn"].meta["tasks"], "pca_tasks": rem["pca"].meta["tasks"],
                    "backend": [rem[m].meta.get("backend") for m in kw["methods"]]}

        case("idim", idim)

        def minibatch_cases() -> dict:
            # ranges of whole minibatches, one task each; mean HSICs weighted by batch count
            out: dict[str, Any] = {}
            for key, src, other, kw in (
                    ("linear", s64, None, {}),
                    ("rbf_cross_sample", s64, s64b, {"kernel": "rbf", "sample": 3000,
                                                     "batch_size": 200, "seed": 5}),
                    ("bf16", sbf, None, {"batch_size": 100})):
                loc = ls.cka(src, other, estimator="minibatch", progress=False, **kw)
                rem = ls.cka(src, other, estimator="minibatch", progress=False, backend="ray",
                             **kw)
                bw = [_diff(list(loc.meta[k].values()), list(rem.meta[k].values()))
                      for k in ("bandwidths_a", "bandwidths_b") if k in loc.meta]
                out[key] = {"diff": _diff(loc.values, rem.values),
                            "hsic": _diff(loc.extra["hsic"], rem.extra["hsic"])
                            / float(np.nanmax(np.abs(loc.extra["hsic"]))),
                            "bw": max(bw, default=0.0),
                            "same": [loc.meta[k] == rem.meta[k] for k in
                                     ("n", "rows_seen", "n_batches")],
                            "tasks": rem.meta["tasks"], "backend": rem.meta["backend"]}
            bad = dict(x64)
            bad["l3"] = bad["l3"].copy()
            bad["l3"][4321, 0] = np.nan
            snan = f"{tmp}/mb-nan"
            ls.write_store(snan, bad, dtype="float64", shard_bytes=1 << 20)
            errs = {}
            for backend in ("local", "ray"):
                try:
                    ls.cka(snan, estimator="minibatch", progress=False, backend=backend)
                    errs[backend] = "no error"
                except Exception as e:  # noqa: BLE001 - compared below
                    errs[backend] = f"{type(e).__name__}: {e}"
            out["errors"] = errs
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                a = ls.cka(snan, estimator="minibatch", nonfinite="nan", progress=False)
                b = ls.cka(snan, estimator="minibatch", nonfinite="nan", progress=False,
                           backend="ray")
            out["nan"] = {"diff": _diff(a.values, b.values),
                          "rows": [a.meta.get("nonfinite_rows"), b.meta.get("nonfinite_rows")]}
            return out

        case("minibatch", minibatch_cases)

        def report() -> dict:
            got = {}
            for backend in ("local", "ray"):
                path = ls.report(s64, s64b, f"{tmp}/report-{backend}", sample=400, bootstrap=4,
                                 progress=False, backend=backend)
                with open(path.parent / "results.json") as f:
                    got[backend] = json.load(f)
            diffs = {}
            for tag, res in got["local"]["results"].items():
                for key, r in res.items():
                    if isinstance(r, dict) and "values" in r:
                        a, b = r["values"], got["ray"]["results"][tag][key]["values"]
                        diffs[f"{tag}/{key}"] = _diff(_numbers(a), _numbers(b))
            return {"diffs": diffs, "diff": max(diffs.values()), "notes": got["ray"]["notes"],
                    "backend": got["ray"]["parameters"]["backend"],
                    "summary_equal": got["ray"]["summary"] == got["local"]["summary"]}

        case("report", report)

        def commands() -> dict:
            out = {}
            for name, argv in (("rsa", ["rsa", s64, "--sample", "300"]),
                               ("id", ["id", s64, "--sample", "800", "--method", "mle"]),
                               ("minibatch", ["cka", s64, "--estimator", "minibatch"])):
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    rc = cli([*argv, "--ray", cluster.address])
                out[name] = {"rc": rc, "stdout": buf.getvalue()}
            return out

        case("cli_sampled", commands)

        def node_lost(retries: int) -> dict:
            # A worker node killed mid-job (SIGKILL, no goodbye): the node that holds the
            # first finished range's partial sums, which a merge not yet run needs. With
            # retries its lost work is redone on the other node and a replacement that
            # joins; without, the job ends with a ClusterError.
            refs: list[Any] = []
            wait_all = _ray.wait_all

            def spy(ray_: Any, rs: Any, *a: Any, **kw: Any) -> None:
                refs[:] = list(rs)
                wait_all(ray_, rs, *a, **kw)

            killed: dict[str, Any] = {}

            def cb(done: int, total: int) -> None:
                if killed:
                    return
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
                locs = ray.experimental.get_object_locations(ready)
                held = {n for r in ready for n in locs[r]["node_ids"]}
                for node in list(cluster.worker_nodes):
                    if node.node_id in held:
                        cluster.remove_node(node, allow_graceful=False)
                        killed["node"] = node.node_id
                        break
                killed["ready"] = len(ready)
                killed["held"] = sorted(held)
                killed["workers"] = sorted(n.node_id for n in cluster.worker_nodes)
                cluster.add_node(num_cpus=1)

            _ray.wait_all = spy
            _ray.MAX_RETRIES = retries
            out: dict[str, Any] = {}
            t0 = time.perf_counter()
            try:
                rem = ls.cka(s64, progress=cb, backend="ray")
                out["diff"] = _diff(rem.values, ls.cka(s64, progress=False).values)
                out["raised"] = "nothing"
            except ls.ClusterError as e:
                out["raised"] = f"ClusterError: {e}"
            finally:
                _ray.wait_all = wait_all
                _ray.MAX_RETRIES = 3
            out.update(seconds=time.perf_counter() - t0, killed=killed.get("node"),
                       ready=killed.get("ready"), held=killed.get("held"),
                       workers=killed.get("workers"))
            cluster.wait_for_nodes()
            return out

        case("node_lost", lambda: node_lost(3))
        case("node_lost_no_retries", lambda: node_lost(0))

        def cka_losing_nodes(progress: Any, undo: Any) -> dict:
            # linear CKA on Ray while every worker node leaves (``progress`` or ``undo``'s
            # spy removes them): what it raised and how long it took; then ``undo`` and the
            # two nodes back for the next checks
            _ray.NO_NODE_SECONDS = 3.0
            out: dict[str, Any] = {}
            t0 = time.perf_counter()
            try:
                ls.cka(s64, progress=progress, backend="ray")
                out["raised"] = "nothing"
            except ls.ClusterError as e:
                out["raised"] = f"ClusterError: {e}"
            finally:
                undo()
                _ray.NO_NODE_SECONDS = 60.0
            out["seconds"] = time.perf_counter() - t0
            for _ in range(2):
                cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            return out

        def no_node() -> dict:
            # every worker node leaves mid-job: no hang, a ClusterError in bounded time
            def cb(done: int, total: int) -> None:
                if cluster.worker_nodes:
                    for node in list(cluster.worker_nodes):
                        cluster.remove_node(node)

            return cka_losing_nodes(cb, lambda: None)

        case("no_node", no_node)

        def no_node_at_merge() -> dict:
            # every worker node leaves after the range tasks finished, while their merges
            # run or their results wait on the nodes: fetching the result is watched too
            wait_all = _ray.wait_all

            def spy(ray_: Any, rs: Any, *a: Any, **kw: Any) -> None:
                wait_all(ray_, rs, *a, **kw)
                for node in list(cluster.worker_nodes):
                    cluster.remove_node(node, allow_graceful=False)

            def undo() -> None:
                _ray.wait_all = wait_all

            _ray.wait_all = spy
            return cka_losing_nodes(False, undo)

        case("no_node_at_merge", no_node_at_merge)

        def node_errors() -> dict:
            st = ls.open(s64)
            plan = _native.TilePlan.single([dims[0]], 1, n)
            fn = _ray._remote(ray, "tile")
            out: dict[str, str] = {}
            parts = {
                "fingerprint": _ray.Part(str(st.path), "0" * 64, None, ("l0",)),
                "missing": _ray.Part(f"{tmp}/not-there", "0" * 64, None, ("l0",)),
            }
            for key, part in parts.items():
                try:
                    ray.get(fn.remote(plan, ["l0"], [part], 0, 0, 100, None, True, None))
                    out[key] = "no error"
                except ray.exceptions.RayTaskError as e:
                    cause = e.cause
                    out[key] = f"{type(cause).__name__}: {cause}"
            bad = dict(x64)
            bad["l1"] = bad["l1"].copy()
            bad["l1"][4321, 7] = np.nan
            sbad = f"{tmp}/nan"
            ls.write_store(sbad, bad, dtype="float64", shard_bytes=1 << 20)
            try:
                ls.cka(sbad, progress=False, backend="ray")
                out["nonfinite"] = "no error"
            except Exception as e:  # noqa: BLE001 - the test checks the class and text
                out["nonfinite"] = f"{type(e).__name__}: {e}"
            try:
                ls.mutual_knn(sbad, progress=False, backend="ray", sample=None)
                out["knn_nonfinite"] = "no error"
            except Exception as e:  # noqa: BLE001 - the test checks the class and text
                out["knn_nonfinite"] = f"{type(e).__name__}: {e}"
            return out

        case("errors", node_errors)

        def command() -> dict:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                rc = cli(["cka", s64, "--ray", cluster.address])
            return {"rc": rc, "stdout": buf.getvalue()}

        case("cli", command)

        def interrupt() -> dict:
            # Ctrl-C while waiting on the user's cluster: KeyboardInterrupt raised, a warning
            # that the submitted tasks run on, no ray.cancel (it can abort the driver), the
            # session left up and the next call equal to the first.
            def cb(done: int, total: int) -> None:
                raise KeyboardInterrupt

            out: dict[str, Any] = {}
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                try:
                    ls.cka(s64, progress=cb, backend="ray")
                    out["raised"] = "nothing"
                except KeyboardInterrupt:
                    out["raised"] = "KeyboardInterrupt"
            out["warnings"] = [str(x.message) for x in w]
            out["alive"] = ray.is_initialized()
            a = ls.cka(s64, progress=False, backend="ray")
            b = ls.cka(s64, progress=False)
            out["diff"] = _diff(a.values, b.values)
            return out

        case("interrupt", interrupt)
    finally:
        results["_running"] = "shutdown"
        _save(out, results)
        faulthandler.dump_traceback_later(CASE_SECONDS, repeat=True, file=sys.stderr)
        ray.shutdown()
        cluster.shutdown()
        faulthandler.cancel_dump_traceback_later()
        del results["_running"]
        try:
            case("interrupt_own", lambda: interrupt_own(ls, ray, s64))
        finally:
            _save(out, results)


def interrupt_own(ls: Any, ray: Any, store: str) -> dict:
    """Ctrl-C in a session layerscope started (no address): the session is shut down, its
    workers with it, and the next call starts a new one."""
    def cb(done: int, total: int) -> None:
        raise KeyboardInterrupt

    out: dict[str, Any] = {}
    try:
        ls.cka(store, progress=cb, backend="ray")
        out["raised"] = "nothing"
    except KeyboardInterrupt:
        out["raised"] = "KeyboardInterrupt"
    out["alive"] = ray.is_initialized()
    a = ls.cka(store, progress=False, backend="ray")
    out["alive_after"] = ray.is_initialized()
    out["diff"] = _diff(a.values, ls.cka(store, progress=False).values)
    ray.shutdown()
    return out


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1], sys.argv[2])
