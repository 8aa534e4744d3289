"""The memory budget and never-abort guarantees (issue: "Never abort").

* Sizes parse in every documented form; bad ones are InvalidArgumentError naming the
  parameter (or the environment variable), the value and the accepted forms.
* The budget comes from the argument, else LAYERSCOPE_MAX_MEMORY, else the machine.
* Every measure family, run in a child interpreter under a lowered RLIMIT_AS on inputs that
  need more than the limit, raises MemoryBudgetError and the interpreter exits cleanly —
  once through the check before the pass (the default budget reads RLIMIT_AS) and once
  through the fallible allocation behind it (``max_memory="1T"`` lets the check pass, so the
  allocation itself is refused).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import layerscope as ls
import numpy as np
import pytest
from layerscope import InvalidArgumentError, MemoryBudgetError, _native

ENV = "LAYERSCOPE_MAX_MEMORY"


# ------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    "text,want",
    [
        (4096, 4096),
        ("4096", 4096),
        ("512M", 512 << 20),
        ("4G", 4 << 30),
        ("4g", 4 << 30),
        ("1.5GiB", 3 << 29),
        ("1.5 GiB", 3 << 29),
        ("800MB", 800_000_000),
        ("2TB", 2 * 10**12),
        ("1K", 1024),
        (np.int64(7), 7),
        (4e9, 4_000_000_000),
    ],
)
def test_sizes_parse(text: object, want: int) -> None:
    b = ls.memory_budget(text)
    assert b.bytes == want
    assert b.source == "max_memory argument"


@pytest.mark.parametrize(
    "bad", [0, -1, "lots", "4Q", float("nan"), float("inf"), True, "", "-1G", "0G", [1], 2**64]
)
def test_bad_sizes_name_the_parameter_and_the_forms(bad: object) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        ls.memory_budget(bad)
    msg = str(e.value)
    assert "max_memory" in msg and "512M" in msg, msg
    # every measure takes the same forms and the same errors, before reading anything
    x = {"a": np.zeros((8, 3)), "b": np.ones((8, 3))}
    for fn in (
        lambda: ls.cka(x, max_memory=bad, progress=False),
        lambda: ls.spectrum(x, max_memory=bad, progress=False),
        lambda: ls.rsa(x, max_memory=bad, progress=False),
        lambda: ls.mutual_knn(x, k=2, max_memory=bad, progress=False),
        lambda: ls.intrinsic_dimension(x, max_memory=bad, progress=False),
    ):
        with pytest.raises(InvalidArgumentError, match="max_memory"):
            fn()


def test_machine_budget_is_a_fraction_of_available_memory() -> None:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    code = "import layerscope as ls; b = ls.memory_budget(); print(b.bytes); print(b.source)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    got, source = int(out[0]), out[1]
    avail = None
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
    assert avail is not None
    assert 0 < got <= 0.8 * avail * 1.05  # MemAvailable moves a little between the reads
    assert source.startswith("0.8 ×"), source


def test_environment_variable_sets_the_default(tmp_path: Path) -> None:
    code = "import layerscope as ls; b = ls.memory_budget(); print(b.bytes, '|', b.source)"
    env = {**os.environ, ENV: "1.5G"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.split("|")[0].strip() == str(3 << 29)
    assert f"{ENV}=1.5G" in out
    # the argument wins over the variable
    code2 = "import layerscope as ls; print(ls.memory_budget('1M').bytes)"
    out2 = subprocess.run([sys.executable, "-c", code2], env=env, capture_output=True,
                          text=True, check=True).stdout
    assert out2.strip() == str(1 << 20)
    # a bad value names the variable
    bad = subprocess.run(
        [sys.executable, "-c", "import layerscope as ls; ls.memory_budget()"],
        env={**os.environ, ENV: "lots"}, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "InvalidArgumentError" in bad.stderr and ENV in bad.stderr, bad.stderr


def test_info_prints_the_budget(tmp_path: Path) -> None:
    exe = [sys.executable, "-m", "layerscope"]
    out = subprocess.run([*exe, "info", "--budget", "--max-memory", "2G"], capture_output=True,
                         text=True, check=True).stdout
    assert "2.0 GiB" in out and "max_memory argument" in out, out
    js = subprocess.run([*exe, "info", "--budget", "--json"], capture_output=True, text=True,
                        check=True, env={**os.environ, ENV: "3G"}).stdout
    assert json.loads(js)["memory_budget"] == {"bytes": 3 << 30, "source": f"{ENV}=3G"}
    p = tmp_path / "s"
    ls.write_store(p, {"a": np.zeros((4, 8), np.float32), "b": np.ones((4, 8), np.float32)})
    out = subprocess.run([*exe, "info", str(p), "--max-memory", "1K"], capture_output=True,
                         text=True, check=True).stdout
    assert "budget" in out and "max_memory argument" in out, out
    assert "does not fit" in out and "not even one layer" in out, out
    bad = subprocess.run([*exe, "info", "--budget", "--max-memory", "4Q"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "--max-memory" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------ a 7-8B model's shape


@pytest.fixture(scope="module")
def llama_shaped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """33 layers × 4096 (a 7-8B model's residual stream), 64 rows of bf16: 17 MB on disk,
    137 GiB of all-pairs accumulator."""
    torch = pytest.importorskip("torch")
    p = tmp_path_factory.mktemp("llama") / "store"
    g = torch.Generator().manual_seed(0)
    ls.write_store(p, {f"layer{i}": torch.randn(64, 4096, generator=g).to(torch.bfloat16)
                       for i in range(33)})
    return p


def test_llama_shaped_store_tiles_within_the_budget(llama_shaped: Path) -> None:
    # the single pass (137 GiB) says what fits when forced
    with pytest.raises(MemoryBudgetError) as e:
        ls.cka(llama_shaped, max_memory="2G", strategy="single-pass", progress=False)
    msg = str(e.value)
    assert "33 layers (D = 135168" in msg and "GiB" in msg, msg
    assert "max_memory argument" in msg and "at most 3 of these 33" in msg, msg
    # too small for any plan: the minimum that would work
    with pytest.raises(MemoryBudgetError, match="a budget of at least .* for any exact plan"):
        ls.cka(llama_shaped, max_memory="100K", strategy="tiled", progress=False)
    with pytest.raises(MemoryBudgetError, match="a budget of at least"):
        ls.cka(llama_shaped, max_memory="100K", progress=False)
    # tiled within the budget: the same numbers as single passes over the pairs
    names = [f"layer{i}" for i in range(5)]
    r = ls.cka(llama_shaped, layers=names, max_memory="600M", estimator="debiased",
               strategy="tiled", progress=False)
    plan = r.meta["plan"]
    assert plan["strategy"] == "tiled" and plan["passes"] > 1, plan
    assert plan["peak_bytes"] <= 600 << 20, plan
    assert plan["bytes_read"] > plan["bytes_selected"], plan
    assert plan["flops"] == 2 * 64 * (5 * 4096) * (5 * 4096 + 1) // 2, plan
    for i, j in [(0, 4), (1, 2), (3, 3)]:
        pair = sorted({names[i], names[j]})
        one = ls.cka(llama_shaped, layers=pair, max_memory="2G", estimator="debiased",
                     strategy="single-pass", progress=False)
        assert one.meta["plan"]["strategy"] == "single-pass"
        assert r.values[i, j] == pytest.approx(one.values[0, -1], abs=1e-6), (i, j)
        assert r.extra["biased"][i, j] == pytest.approx(one.extra["biased"][0, -1], abs=1e-6)
    # 64 rows against D = 135168: unforced, the whole model goes the Gram route (33 Grams
    # of 64 × 64), the same numbers as the tiles
    g = ls.cka(llama_shaped, estimator="debiased", progress=False)
    assert g.meta["plan"]["strategy"] == "gram" and g.values.shape == (33, 33), g.meta["plan"]
    assert np.abs(g.values[:5, :5] - r.values).max() <= 1e-6


def test_llama_shaped_store_with_environment(llama_shaped: Path) -> None:
    code = f"import layerscope as ls; ls.cka({str(llama_shaped)!r}, progress=False)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, ENV: "100K"})
    assert r.returncode == 1 and "MemoryBudgetError" in r.stderr and f"{ENV}=100K" in r.stderr


def test_tiled_cka_runs_under_rlimit() -> None:
    """8 × 4096 (a 1.1 GiB single-pass accumulator) under 512 MiB of address-space headroom:
    the tiles fit the budget the RLIMIT gives, and the pass completes."""
    code = _PRELUDE + textwrap.dedent("""
        x = {f'l{i}': np.random.default_rng(i).standard_normal((16, 4096)).astype(np.float32)
             for i in range(8)}
        limit(512 << 20)
        r = ls.cka(x, strategy="tiled", progress=False)
        print("PLAN", r.meta["plan"]["strategy"], r.meta["plan"]["passes"],
              float(np.nanmin(np.diag(r.values))))
    """)
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env["RAYON_NUM_THREADS"] = "2"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    words = out.stdout.split()
    assert words[:2] == ["PLAN", "tiled"] and int(words[2]) > 1 and float(words[3]) == 1.0, \
        out.stdout


# ------------------------------------------------- every family under a lowered RLIMIT_AS

_PRELUDE = """
import resource, sys
import numpy as np
import layerscope as ls

def vm_size():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")

def limit(headroom):
    # the address space this interpreter already uses, plus `headroom` bytes
    lim = vm_size() + headroom
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

def run(fn):
    try:
        fn()
    except ls.MemoryBudgetError as e:
        print("MemoryBudgetError:", e)
        sys.exit(0)
    except BaseException as e:
        print("OTHER", type(e).__name__, e)
        sys.exit(3)
    print("NO ERROR")
    sys.exit(4)
"""


def _child(body: str, timeout: float = 300) -> str:
    code = _PRELUDE + textwrap.dedent(body)
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env["RAYON_NUM_THREADS"] = "2"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=timeout, env=env)
    # a clean exit: no abort (SIGABRT = -6), no kill, no traceback
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-3000:])
    assert "MemoryBudgetError" in r.stdout, r.stdout
    return r.stdout


# (setup, call[, headroom]): the call needs far more than the headroom (default 512 MiB)
# beyond what the setup holds.
FAMILIES: dict[str, tuple] = {
    "linear_cka": (
        "x = {f'l{i}': np.random.default_rng(i).standard_normal((16, 4096)).astype(np.float32)"
        " for i in range(8)}",
        "ls.cka(x, strategy='single-pass', progress=False{mm})",
    ),
    "linear_cka_store": (
        "import tempfile; d = tempfile.mkdtemp()\n"
        "ls.write_store(d + '/s', {f'l{i}': np.ones((16, 4096), np.float32) * i"
        " + np.arange(4096, dtype=np.float32) for i in range(8)})\n"
        "x = ls.open(d + '/s')",
        "ls.cka(x, strategy='single-pass', progress=False{mm})",
    ),
    "rbf_cka": (
        "x = {'a': np.random.default_rng(0).standard_normal((20000, 4)),"
        " 'b': np.random.default_rng(1).standard_normal((20000, 4))}",
        "ls.cka(x, kernel='rbf', sample=20000, progress=False{mm})",
    ),
    "minibatch_cka": (
        "x = {'a': np.random.default_rng(0).standard_normal((20000, 4)),"
        " 'b': np.random.default_rng(1).standard_normal((20000, 4))}",
        "ls.cka(x, estimator='minibatch', batch_size=20000, progress=False{mm})",
    ),
    "spectrum": (
        "x = {'a': np.random.default_rng(0).standard_normal((8, 12000))}",
        "ls.spectrum(x, progress=False{mm})",
    ),
    "alignment": (
        "x = {'a': np.random.default_rng(0).standard_normal((8, 9000)),"
        " 'b': np.random.default_rng(1).standard_normal((8, 9000))}",
        "ls.alignment(x, k=2, progress=False{mm})",
    ),
    "intrinsic_dimension": (
        "x = {'a': np.random.default_rng(0).standard_normal((20000, 4))}",
        "ls.intrinsic_dimension(x, method='mle', k=15000, sample=None, progress=False{mm})",
    ),
    "rsa": (
        "x = {'a': np.random.default_rng(0).standard_normal((30000, 3))}",
        "ls.rsa(x, sample=None, progress=False{mm})",
    ),
    "mutual_knn": (
        "x = {'a': np.random.default_rng(0).standard_normal((20000, 3)),"
        " 'b': np.random.default_rng(1).standard_normal((20000, 3))}",
        "ls.mutual_knn(x, k=15000, sample=None, progress=False{mm})",
    ),
    "store_blocks": (
        "import tempfile; d = tempfile.mkdtemp()\n"
        "ls.write_store(d + '/s', {'a': np.ones((32768, 1024), np.float32)})\n"
        "x = ls.open(d + '/s')",
        "next(iter(x.blocks(block_rows=10**12, dtype=np.float64{mm})))",
        128 << 20,
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("route", ["check", "allocation"])
def test_no_input_ends_the_interpreter(family: str, route: str) -> None:
    setup, call, *rest = FAMILIES[family]
    headroom = rest[0] if rest else 512 << 20
    mm = "" if route == "check" else ", max_memory='1T'"
    out = _child(f"""
{setup}
limit({headroom})
run(lambda: {call.format(mm=mm)})
""")
    if route == "check":
        # refused before the pass, by the budget the machine's RLIMIT_AS gives
        assert "RLIMIT_AS headroom" in out, out
    else:
        assert "could not allocate" in out, out


def test_binding_entry_points_take_the_budget() -> None:
    x = np.random.default_rng(0).standard_normal((200, 3))
    with pytest.raises(MemoryBudgetError, match="distance matrix|RBF Gram"):
        _native.rbf_hsic([x], None, max_memory=1000)
    with pytest.raises(MemoryBudgetError, match="RSA"):
        _native.rsa_matrix([x], None, max_memory=1000)
    with pytest.raises(MemoryBudgetError, match="nearest-neighbour"):
        _native.neighbour_matrix([x], None, "mutual_knn", k=3, max_memory=1000)
    with pytest.raises(MemoryBudgetError, match="nearest-neighbour"):
        _native.knn_graph(x, 3, max_memory=1000)
    src = ls._source.resolve({"a": x, "b": x})
    with pytest.raises(MemoryBudgetError, match="minibatch CKA"):
        _native.minibatch_cka_pass([ls._source.native_part(src, ["a", "b"])], ["a", "b"],
                                   batch_size=4096, max_memory=1000)
    with pytest.raises(MemoryBudgetError, match="moment accumulator"):
        _native.check_moment_memory([4096] * 33, 256, "float32", 1 << 30)
    b, src = _native.check_moment_memory([8, 8], 256, "float64", 1 << 30)
    assert b == 1 << 30 and src == "max_memory argument"


def test_eigendecompositions_are_checked_before_the_pass() -> None:
    # the pass (a (d+1)² accumulator, ~8 MB) fits 24 MB; the eigendecomposition held with it
    # (its vectors and one solver workspace per thread, ~40 MB and more) does not: refused
    # before any row is read, since a spectrum cannot be split across passes
    x = {"a": np.random.default_rng(0).standard_normal((8, 1000))}
    with pytest.raises(MemoryBudgetError, match="moments and their eigendecomposition"):
        ls.spectrum(x, max_memory="24M", progress=False)
    assert len(ls.spectrum(x, max_memory="1G", progress=False).eigenvalues["a"]) == 1000
