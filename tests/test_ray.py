"""``backend="ray"``: every moment measure on a local Ray cluster (a head and two one-CPU worker
nodes) equals the local run — 1e-10 in float64, 1e-6 in float32 — through a merge tree of
several row ranges per tile, a tiled plan, two stores, in-memory arrays; a node that sees a
different or no store, and a non-finite value, are clear errors; the CLI's ``--ray``.

The cluster runs inside a network namespace of its own (``unshare -n``, loopback only:
``tests/ray_checks.py``), never on the machine's interfaces; every Ray process it starts is
stopped. Without ray, or where a namespace cannot be made (not root), these tests are
skipped with that reason."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import layerscope as ls
import pytest
from layerscope.errors import InvalidArgumentError, MissingDependencyError

HERE = Path(__file__).parent


def _netns() -> str | None:
    """Why a loopback-only namespace cannot be made here (None: it can)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare/ip not found"
    p = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"],
                       capture_output=True, text=True)
    return None if p.returncode == 0 else f"unshare -n failed ({p.stderr.strip()}; needs root)"


def _kill_leftovers(tag: str) -> list[int]:
    """Kill any process whose command line names the cluster's temp dir (none should be
    left after the script's shutdown; this is the safety net)."""
    killed = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if tag in cmd and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
            except OSError:
                pass
    return killed


@pytest.fixture(scope="module")
def checks() -> dict:
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (pip install 'layerscope[ray]')")
    why = _netns()
    if why:
        pytest.skip(f"no loopback-only network namespace for the Ray cluster: {why}")
    # Ray's own internal checks abort a process now and then ("You have likely discovered a
    # bug in Ray"); such a run is retried once, with a warning, and anything else fails.
    res, err = _run_checks()
    if res is None and RAY_BUG in err:
        warnings.warn(f"the Ray checks are rerun after Ray aborted:\n{err[-1500:]}",
                      stacklevel=1)
        res, err = _run_checks()
    elif res is not None and _ray_start_hung(res):
        warnings.warn("the Ray checks are rerun after starting a Ray node hung inside Ray:\n"
                      + _ray_start_hung(res)[-3000:], stacklevel=1)
        res, err = _run_checks()
    if res is None:
        pytest.fail(err)
    return res


#: What Ray prints when one of its own internal checks aborts a process.
RAY_BUG = "You have likely discovered a bug in Ray"
#: Where the stack of a check stuck in starting a Ray node shows it (seen once, with two test
#: suites sharing the 2 cores: ``ray.init`` of a new local session waiting on its GCS client
#: for over 500 s).
RAY_START = "in _init_gcs_client"


def _ray_start_hung(res: dict) -> str:
    """The trace of a case that hung inside Ray's own node start-up (else "")."""
    for r in res.values():
        if isinstance(r, dict) and str(r.get("error", "")).startswith("still running") \
                and RAY_START in str(r.get("trace", "")):
            return str(r["trace"])
    return ""


#: Seconds the whole check script may run (it takes about 100).
CHECKS_SECONDS = 600


def _run_checks() -> tuple[dict | None, str]:
    """Run ``ray_checks.py`` on a fresh cluster in its own network namespace: ``(results,
    "")``, or ``(None, why)`` when it wrote nothing. A run stopped after ``CHECKS_SECONDS``
    keeps the cases that finished; the one under way records the stacks the script printed."""
    tmp = tempfile.mkdtemp(prefix="lsrt")  # short: Ray's socket paths live under it
    out = os.path.join(tmp, "checks.json")
    cmd = ["unshare", "-n", "bash", "-c", 'ip link set lo up && exec "$0" "$@"',
           sys.executable, str(HERE / "ray_checks.py"), out, os.path.join(tmp, "ray")]
    try:
        try:
            # a session layerscope starts itself (no address) keeps its files under the
            # same tag, so that a leftover of it is found and stopped too
            os.makedirs(os.path.join(tmp, "ray-own", "ray"))
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=CHECKS_SECONDS,
                               env={**os.environ, "RAY_ADDRESS": "",
                                    "RAY_TMPDIR": os.path.join(tmp, "ray-own")})
            code, stderr, hung = str(p.returncode), p.stderr, False
        except subprocess.TimeoutExpired as e:
            err = e.stderr or b""
            code, hung = "killed", True
            stderr = err.decode(errors="replace") if isinstance(err, bytes) else err
        left = _kill_leftovers(os.path.join(tmp, "ray"))
        if not os.path.exists(out):
            return None, f"the Ray checks wrote nothing (exit {code}):\n{stderr[-4000:]}"
        with open(out) as f:
            res = json.load(f)
        running = res.pop("_running", None)
        if hung or running:
            res[running or "_after_the_cases"] = {
                "error": f"still running after {CHECKS_SECONDS} s (exit {code})" if hung
                else f"the script ended (exit {code}) during this case",
                "trace": stderr[-12000:]}
        res["_leftovers"] = left
        return res, ""
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ok(res: dict, case: str) -> dict:
    assert case in res, f"the check {case!r} never ran (an earlier one stopped the script)"
    r = res[case]
    assert "error" not in r, r.get("trace", r)
    return r


@pytest.mark.parametrize("case", ["cka_bf16_f32", "cka_f64", "cka_tiled", "cka_cross",
                                  "cka_arrays_sample", "spectrum", "alignment_tiles",
                                  "analyze"])
def test_ray_equals_local(checks: dict, case: str) -> None:
    r = _ok(checks, case)
    assert r["diff"] <= r["tol"], r
    t = r["tasks"]
    assert t["nodes"] == 2 and t["cpus_per_task"] == 1, t
    assert t["merge_order"].startswith("adjacent row ranges, balanced binary tree")


def test_ray_device_tasks(checks: dict) -> None:
    """device= on Ray: each range task forms its tile's products on the torch engine
    (device='cpu' here: the code a GPU task runs, without num_gpus); equal to the local Rust
    pass (tiles, f64: 1e-10; bf16 spectra: 1e-6 relative); 'cuda' on a cluster without
    GPUs, a device index, and the sampled measures are InvalidArgumentErrors; 'auto' without
    GPUs is the Rust engine."""
    r = _ok(checks, "device_cpu")
    assert r["diff"] <= r["tol"] and r["diff_debiased"] <= r["tol"], r
    assert r["spectrum_rel"] <= 1e-6, r
    assert r["passes"] > 1 and r["tasks"]["ranges"] >= r["passes"], r
    assert r["tasks"]["gpus_per_task"] == 0 and r["device"].startswith("cpu"), r
    assert r["spectrum_device"].startswith("cpu"), r
    assert "no alive node of the cluster has a GPU" in r["errors"]["cuda"], r
    assert "Ray assigns a GPU to each task" in r["errors"]["index"], r
    assert "run on the nodes' CPUs" in r["errors"]["rbf"], r
    assert r["auto_device"] is None, r


def test_ray_tasks_follow_the_plan(checks: dict) -> None:
    one = _ok(checks, "cka_f64")
    # five ranges of a single-pass tile (6000 rows, at least 1024 each): ((r0 r1) (r2 r3)) r4
    # — three merge tasks, the root's two halves merged on the driver, depth 3
    assert one["strategy"] == "single-pass" and one["backend"] == "ray"
    assert one["tasks"]["ranges"] == 5 and one["tasks"]["merges"] == 3
    assert one["tasks"]["driver_merges"] == 1
    assert one["tasks"]["merge_depth"] == 3
    bf = _ok(checks, "cka_bf16_f32")
    assert bf["compute"] == "float32" and bf["n"] == 6000
    tiled = _ok(checks, "cka_tiled")
    assert tiled["strategy"] == "tiled" and tiled["passes"] > 1
    # every tile cut in two ranges, merged on the driver (cross tiles too)
    assert tiled["tasks"]["ranges"] == 2 * tiled["passes"], tiled
    assert tiled["tasks"]["driver_merges"] == tiled["passes"]
    assert tiled["single_diff"] <= 1e-10  # and equal to the local single pass
    assert _ok(checks, "alignment_tiles")["strategy"] == "layer-tiles"
    assert _ok(checks, "spectrum")["strategy"] == "per-layer"
    assert _ok(checks, "cka_arrays_sample")["n"] == 2500


def test_ray_errors_name_the_node(checks: dict) -> None:
    e = _ok(checks, "errors")
    assert e["fingerprint"].startswith("MismatchError: node ") and "different store" in e[
        "fingerprint"], e
    assert e["missing"].startswith("StoreNotFoundError: node ") and "not-there" in e[
        "missing"], e
    # the row in the store, not in the task's range
    assert e["nonfinite"].startswith("NonFiniteError") and "row 4321" in e["nonfinite"], e
    # a layer task's own error, raised as itself on the driver
    assert e["knn_nonfinite"].startswith("NonFiniteError") and "row 4321" in e[
        "knn_nonfinite"], e


@pytest.mark.parametrize("case", ["rbf", "rbf_cross_debiased", "rbf_bf16", "rsa", "rsa_cross",
                                  "mutual_knn_arrays"])
def test_ray_sampled_measures_equal_local_to_the_bit(checks: dict, case: str) -> None:
    # a task per layer prepares (Gram, RDM, kNN graph), a task per block of pairs tabulates,
    # with the functions of the local call: the same numbers exactly
    r = _ok(checks, case)
    assert r["diff"] == 0.0 and r["bw"] == 0.0 and r["hash"], r
    assert r["backend"] == "ray"
    t = r["tasks"]
    nl = r["shape"][0] + (r["shape"][1] if "cross" in case else 0)
    assert t["prepare"] == nl and t["layers_per_block"] == 2, t
    groups = -(-r["shape"][0] // 2)
    # within one source: the upper triangle of groups; across two: every block
    assert t["blocks"] == (groups * groups if "cross" in case else groups * (groups + 1) // 2)
    assert t["nodes"] == 2


def test_ray_rbf_nonfinite_nan(checks: dict) -> None:
    r = _ok(checks, "rbf_nan")
    assert r["diff"] == 0.0
    assert r["ray"]["rows"] == r["local"]["rows"] and list(r["ray"]["rows"]) == ["l2"]
    assert r["ray"]["warnings"] == r["local"]["warnings"] and len(r["ray"]["warnings"]) == 1


def test_ray_intrinsic_dimension(checks: dict) -> None:
    r = _ok(checks, "idim")
    assert all(v == 0.0 for v in r["diffs"].values()), r
    assert r["scales"] and r["details"]
    assert r["tasks"]["tasks"] == 4 and r["tasks"]["layers"] == 4
    assert r["pca_tasks"]["ranges"] > 0  # PCA-ID from the moment passes' range tasks
    assert r["backend"] == ["ray"] * 4


def test_ray_report(checks: dict) -> None:
    r = _ok(checks, "report")
    assert r["backend"] == "ray" and r["notes"] == [] and r["summary_equal"], r
    assert r["diff"] <= 1e-10, r["diffs"]
    for k, v in r["diffs"].items():  # the sampled measures: exactly
        if "rbf" in k or "id_" in k:
            assert v == 0.0, (k, v)


def test_ray_minibatch(checks: dict) -> None:
    r = _ok(checks, "minibatch")
    for key in ("linear", "rbf_cross_sample", "bf16"):
        c = r[key]
        assert c["backend"] == "ray" and all(c["same"]), (key, c)
        assert c["diff"] <= 1e-12 and c["hsic"] <= 1e-12 and c["bw"] <= 1e-12, (key, c)
        t = c["tasks"]
        assert t["ranges"] == 2 and t["nodes"] == 2, (key, t)
    # 6000 rows in 256-row batches: 23 whole ones and a final 112-row batch, 12 + 12
    assert r["linear"]["tasks"]["batches_per_range"] == [12, 12]
    # the row in the whole sequence, not in the task's range; nonfinite="nan" equal
    assert r["errors"]["ray"] == r["errors"]["local"], r["errors"]
    assert "row 4321" in r["errors"]["ray"]
    assert r["nan"]["rows"] == [{"l3": 4321}, {"l3": 4321}] and r["nan"]["diff"] <= 1e-12


def test_ray_cli_sampled(checks: dict) -> None:
    c = _ok(checks, "cli_sampled")
    assert c["rsa"]["rc"] == 0 and "# ray: 4 layer tasks, 3 pair-block tasks (up to 2 layers " \
        "per group) on 2 nodes, 1 CPU per task" in c["rsa"]["stdout"], c
    assert c["id"]["rc"] == 0 and "# ray: 4 layer tasks on 2 nodes" in c["id"]["stdout"], c
    assert c["minibatch"]["rc"] == 0 and "# ray: 2 range tasks of whole minibatches (12+12 " \
        "batches) on 2 nodes, 1 CPU per task" in c["minibatch"]["stdout"], c


def test_ray_cli(checks: dict) -> None:
    c = _ok(checks, "cli")
    assert c["rc"] == 0
    assert "# ray: 5 range tasks (5 per tile), 3 merge tasks + 1 on the driver (depth 3) on 2 " \
        "nodes, 1 CPU per task" in c["stdout"], c


def test_ray_processes_all_stopped(checks: dict) -> None:
    assert checks["_leftovers"] == []


@pytest.mark.parametrize("n,b,k", [(6000, 256, 2), (6000, 256, 64), (1000, 256, 3),
                                   (100, 256, 4), (4096, 256, 16), (5, 4, 2)])
def test_minibatch_ranges_hold_the_local_minibatches(n: int, b: int, k: int) -> None:
    from layerscope._ray_sampled import batch_ranges

    r = batch_ranges(n, b, k)
    assert r[0][0] == 0 and r[-1][1] == n
    assert all(p[1] == q[0] for p, q in zip(r, r[1:]))
    assert all(a % b == 0 for a, _ in r)  # every range starts on a batch boundary
    assert len(r) <= max(1, min(k, n // b))
    assert all(stop - start >= b for start, stop in r[:-1])


def test_minibatch_ranges_merge_to_the_one_pass() -> None:
    """The Ray minibatch rule without a cluster: the ranges' results (``rows=``), merged by
    batch count, equal one pass over all rows (linear and RBF, a sample, a NaN layer)."""
    import numpy as np
    from layerscope import _native
    from layerscope._ray_sampled import batch_ranges, merge_minibatch
    from layerscope._source import native_part, resolve

    rng = np.random.default_rng(8)
    x = {f"l{i}": rng.standard_normal((1100, d)) + 50.0 * rng.standard_normal(d)
         for i, d in enumerate([5, 17, 9])}
    x["l2"][700, 3] = np.nan
    src = resolve(x)
    names = list(x)
    parts = [native_part(src, names)]
    for kernel, sample in (("linear", None), ("rbf", sorted(rng.choice(1100, 900, False)))):
        kw = {"kernel": kernel, "batch_size": 64, "num_a": 3, "check_finite": False}
        one = _native.minibatch_cka_pass(parts, names, sample=sample, **kw)
        n = 1100 if sample is None else len(sample)
        ranges = batch_ranges(n, 64, 4)
        got = [_native.minibatch_cka_pass(
            parts, names, **kw,
            **({"rows": (a, b)} if sample is None else {"sample": sample[a:b]}))
            for a, b in ranges]
        m = merge_minibatch(ranges, got, names, 3)
        np.testing.assert_allclose(m["values"], one["values"], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(m["hsic"], one["hsic"], rtol=1e-13, atol=1e-18)
        np.testing.assert_allclose(m["bandwidths"], one["bandwidths"], rtol=1e-13)
        assert m["nonfinite"] == list(one["nonfinite"])
        assert (m["batches"], m["rows_used"], m["rows_seen"]) == (
            one["batches"], one["rows_used"], one["rows_seen"])
    with pytest.raises(InvalidArgumentError, match="row range"):
        _native.minibatch_cka_pass(parts, names, rows=(0, 5000))


def test_import_does_not_import_ray() -> None:
    code = "import sys, layerscope; ls = layerscope; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backend_arguments_are_checked(tmp_path: Path) -> None:
    x = {"a": [[1.0, 2.0], [3.0, 4.0], [5.0, 7.0], [1.0, 0.0]]}
    with pytest.raises(InvalidArgumentError, match="backend"):
        ls.cka(x, backend="dask", progress=False)
    with pytest.raises(InvalidArgumentError, match="ray_address needs backend='ray'"):
        ls.spectrum(x, progress=False, ray_address="auto")


def test_missing_ray_is_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(MissingDependencyError, match=r"layerscope\[ray\]"):
        ls.cka({"a": np.eye(5)}, backend="ray", progress=False)


def test_ray_interrupt_leaves_a_users_cluster_up(checks: dict) -> None:
    r = _ok(checks, "interrupt")
    assert r["raised"] == "KeyboardInterrupt", r
    assert any("run to the end of their row range" in w for w in r["warnings"]), r
    assert r["alive"] and r["diff"] <= 1e-10, r


def test_ray_interrupt_shuts_down_a_session_layerscope_started(checks: dict) -> None:
    r = _ok(checks, "interrupt_own")
    assert r["raised"] == "KeyboardInterrupt" and not r["alive"], r
    assert r["alive_after"] and r["diff"] <= 1e-10, r


def test_ray_worker_node_killed_mid_job(checks: dict) -> None:
    # the node holding the first finished range's partial sums is killed (SIGKILL) before a
    # merge has used them: Ray re-runs its lost work (bounded retries) on the other node and
    # a replacement, and the result equals the local one
    r = _ok(checks, "node_lost")
    assert r["killed"] is not None and r["killed"] in r["held"], r
    assert r["raised"] == "nothing" and r["diff"] <= 1e-10, r


def test_ray_lost_work_without_retries_is_a_cluster_error(checks: dict) -> None:
    r = _ok(checks, "node_lost_no_retries")
    assert r["killed"] is not None, r
    assert r["raised"].startswith("ClusterError: a Ray task's result was lost and could not "
                                  "be recomputed within 0 retries"), r
    assert "its worker or node died" in r["raised"] and "\x1b[" not in r["raised"], r


def test_ray_no_node_left_is_an_error_not_a_hang(checks: dict) -> None:
    # every worker node leaves mid-job (NO_NODE_SECONDS = 3 in the checks)
    r = _ok(checks, "no_node")
    assert r["raised"].startswith("ClusterError: no alive Ray node can run this job's tasks"), r
    assert "Add nodes" in r["raised"], r
    assert r["seconds"] < 60, r


def test_ray_no_node_left_while_merging_is_an_error_not_a_hang(checks: dict) -> None:
    # every worker node leaves after the range tasks finished: the merges' results are
    # fetched under the same watchdog (a lost result, or none computed, is a ClusterError)
    r = _ok(checks, "no_node_at_merge")
    assert r["raised"].startswith("ClusterError: "), r
    assert ("no alive Ray node can run this job's tasks" in r["raised"]
            or "could not be recomputed" in r["raised"]), r
    assert r["seconds"] < 60, r
