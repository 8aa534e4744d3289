"""The command line as a new user meets it: every command works with the core install only
(numpy + tqdm), expected failures are one ``layerscope: error:`` line with exit status 2 and
are found before any work starts, results are saved before anything is printed, names read
from a store cannot drive the terminal, ``--help`` documents every option with its default."""

from __future__ import annotations

import argparse
import os
import re
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import layerscope
import numpy as np
import pytest
from layerscope import cli
from layerscope.cli import build_parser, main

MEASURES = ("cka", "align", "spectrum", "id", "rsa")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(5)
    p = tmp_path_factory.mktemp("cli") / "s"
    base = rng.standard_normal((300, 40))
    layerscope.write_store(p, {f"layer.{i}": (base + 0.5 * i * rng.standard_normal((300, 40)))
                               .astype(np.float32) for i in range(3)})
    return p


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_has_help_and_defaults_are_shown() -> None:
    commands = _commands()
    assert set(MEASURES) | {"info", "verify", "capture", "plan", "report", "demo"} <= set(commands)
    for name, p in commands.items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"layerscope {name} {action.option_strings or action.dest}: no help"
    text = commands["cka"].format_help()
    assert "(default: biased)" in text and "(default: linear)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 20)" in commands["id"].format_help()


@pytest.mark.parametrize("command", MEASURES)
def test_each_measure_prints_table_then_one_footer_line(store: Path, command: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    extra = {"rsa": ["--sample", "100", "--seed", "3"], "align": ["--k", "8"]}.get(command, [])
    assert main([command, str(store), *extra]) == 0
    lines = capsys.readouterr().out.splitlines()
    foot = lines[-1]
    assert re.fullmatch(rf"# {command} \| .+ \| n = \d+ \| .+ \| .+ \| \d+\.\d\d s", foot), foot
    if command == "rsa":
        assert "sample 100 of 300 rows" in foot and "seed 3" in foot
    else:
        assert "all rows" in foot and "no seed" in foot
    assert any("layer.2" in line for line in lines[:-1])  # the table came first
    # --quiet: the footer alone
    assert main([command, str(store), *extra, "--quiet"]) == 0
    quiet = capsys.readouterr().out.splitlines()
    assert len(quiet) == 1 and quiet[0][:quiet[0].rindex("|")] == foot[:foot.rindex("|")]


def test_id_table_has_no_empty_columns_and_spectrum_counts_are_integers(
        store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["id", str(store)]) == 0
    head = capsys.readouterr().out.splitlines()[0].split()
    assert head == ["layer", "id", "rows", "duplicates"]  # no CI without --bootstrap, no error
    assert main(["id", str(store), "--bootstrap", "4", "--method", "gride"]) == 0
    head = capsys.readouterr().out.splitlines()[0].split()
    assert head == ["layer", "id", "ci_low", "ci_high", "error", "rows", "duplicates"]
    assert main(["spectrum", str(store)]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = lines[0].split()
    for line in lines[1:-1]:
        cells = dict(zip(head[1:], line.split()[1:]))
        for col in ("rank", "pca_id_90", "pca_id_95", "pca_id_99"):
            assert re.fullmatch(r"\d+", cells[col]), (col, cells[col])
        assert "." in cells["effective_rank"]


def test_result_saved_before_printing(store: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> str:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(layerscope._text.Table, "to_text", broken)
    out = tmp_path / "r.json"
    assert main(["cka", str(store), "--out", str(out), "--quiet"]) == 0  # quiet: no table
    out.unlink()
    assert main(["cka", str(store), "--out", str(out)]) == cli.EXIT_PIPE
    assert layerscope.load_result(out).values.shape == (3, 3)


def test_results_are_written_with_the_umask(store: Path, tmp_path: Path) -> None:
    res = layerscope.cka(store, progress=False)
    old = os.umask(0o022)
    try:
        assert stat.S_IMODE(res.save(tmp_path / "a.json").stat().st_mode) == 0o644
        os.umask(0o077)
        assert stat.S_IMODE(res.save(tmp_path / "b.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def _fail(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.split("\r")[-1]  # after a progress bar cleared its line
    assert err.startswith("layerscope: error: ") and "Traceback" not in err, err
    return err


def test_output_mistakes_are_found_before_any_work(store: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import layerscope.measures.cli as mcli

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the measure ran before its outputs were checked")

    monkeypatch.setattr(mcli, "cka", never)
    err = _fail(["cka", str(store), "--plot", str(tmp_path / "x.unknownext")], capsys)
    assert "'unknownext'" in err and "png" in err
    err = _fail(["cka", str(store), "--out", "/proc/forbidden/r.json"], capsys)
    assert "cannot write into /proc" in err
    err = _fail(["cka", str(store), "--plot", str(tmp_path / "plot")], capsys)
    assert "without extension" in err


def test_expected_failures_are_one_line(store: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    err = _fail(["info", str(tmp_path / "nope")], capsys)
    assert "nope" in err
    err = _fail(["cka", str(store), "--layers", "layer.9"], capsys)
    assert "layer.9" in err
    _fail(["report", str(store), "-o", "/proc/forbidden", "-q"], capsys)
    with pytest.raises(SystemExit) as e:
        main(["cka", str(store), "--seed", "-1"])
    assert e.value.code == 2 and "--seed: '-1' is not an integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["id", str(store), "--sample", "0"])
    assert "'0' is not an integer >= 1" in capsys.readouterr().err


def test_report_with_mismatched_stores_leaves_no_folder(store: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "o"
    layerscope.write_store(other, {"x": np.zeros((7, 3), np.float32)})
    out = tmp_path / "rep"
    _fail(["report", str(store), str(other), "-o", str(out), "-q"], capsys)
    assert not out.exists()


def test_capture_arguments_are_checked_before_the_model_loads(
        store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    hf = sys.modules["layerscope.capture.hf"]  # layerscope.capture is the Capture class

    def never(model: object) -> None:
        raise AssertionError("the model loaded before the arguments were checked")

    monkeypatch.setattr(hf, "load_local", never)
    texts = tmp_path / "t.txt"
    texts.write_text("one\ntwo\n")
    base = ["capture", "--layers", "encoder.layer.*", "--texts", str(texts)]
    err = _fail([*base, "--model", "minilm", "--out", str(store)], capsys)
    assert "--overwrite" in err and "overwrite=True" in err
    err = _fail([*base, "--model", "sentence-transformers/all-MiniLM-L6-v2",
                 "--out", str(tmp_path / "c")], capsys)
    assert "not a folder on this machine" in err and "'minilm'" in err
    err = _fail([*base, "--model", str(tmp_path), "--out", str(tmp_path / "c")], capsys)
    assert "no config.json" in err
    err = _fail(["capture", "--layers", "x", "--texts", str(tmp_path / "none.txt"),
                 "--model", "minilm", "--out", str(tmp_path / "c")], capsys)
    assert "none.txt: No such file or directory" in err
    assert not (tmp_path / "c").exists()


def test_names_from_a_store_are_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "s"
    evil = "a\x1b[2J\x1b]0;owned\x07\u202eb"
    layerscope.write_store(p, {evil: np.ones((4, 2), np.float32) * np.arange(4)[:, None],
                               "ok": np.arange(8, dtype=np.float32).reshape(4, 2)})
    for args in (["info", str(p)], ["cka", str(p)]):
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
        assert "a\\x1b[2J\\x1b]0;owned\\x07\\u202eb" in out


def test_info_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    p = tmp_path / "many"
    layerscope.write_store(p, {f"layer.{i:05d}": np.zeros((2, 1), np.float32)
                               for i in range(2500)})  # ~100 KB of output: beyond a pipe
    proc = subprocess.Popen([sys.executable, "-m", "layerscope.cli", "info", str(p)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(10)
    proc.stdout.close()  # `| head -c 10`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == cli.EXIT_PIPE and err == "", err


def _core_only_python(tmp_path: Path) -> Path:
    """A virtual environment with the core install only: numpy, tqdm and layerscope itself
    (this checkout's package and extension), none of the extras."""
    venv = tmp_path / "core-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    pkgs = tmp_path / "core-packages"
    pkgs.mkdir()
    here = Path(sysconfig.get_paths()["purelib"])
    for name in ("numpy", "numpy.libs", "tqdm"):
        if (here / name).exists():
            (pkgs / name).symlink_to(here / name)
    (pkgs / "layerscope").symlink_to(Path(layerscope.__file__).parent)
    Path(purelib, "core.pth").write_text(f"{pkgs}\n")
    return python


def test_cli_with_the_core_install_only(store: Path, tmp_path: Path) -> None:
    python = _core_only_python(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(python), "-m", "layerscope.cli", *args], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=300)

    probe = subprocess.run([str(python), "-c", "import pandas"], capture_output=True, env=env)
    assert probe.returncode != 0  # really without the extras
    for command in MEASURES:
        out = tmp_path / f"{command}.json"
        extra = ["--k", "8"] if command == "align" else []
        r = run(command, str(store), *extra, "--out", str(out))
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[-1].startswith(f"# {command} |") and out.exists()
    for args, extra in ((["cka", str(store), "--plot", "h.png"], "plot"),
                        (["demo", "--quick", "--out", "d", "-q"], "plot"),
                        (["capture", "--model", "minilm", "--stdlib-corpus", "2", "--out", "c",
                          "--layers", "x"], "torch")):
        r = run(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"pip install 'layerscope[{extra}]'" in r.stderr, r.stderr
    r = subprocess.run([str(python), "-c", "import layerscope as ls; "
                        f"ls.load_result({str(tmp_path / 'cka.json')!r}).to_pandas()"],
                       capture_output=True, text=True, env=env)
    assert "MissingDependencyError" in r.stderr and "layerscope[plot]" in r.stderr


def test_cca_footer_explains_a_diagonal_below_one(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 10))
    p = tmp_path / "rd"
    layerscope.write_store(p, {"full": rng.standard_normal((400, 12)),
                               "low": np.c_[x, x[:, :4] @ rng.standard_normal((4, 6))]})
    assert main(["align", str(p), "--method", "cca"]) == 0
    out = capsys.readouterr().out
    assert "low (rank 10, ridge" in out and "full (rank" not in out and "r/d" in out
    low = layerscope.alignment(p, method="cca", layers="low", progress=False)
    assert low.values[0, 0] == pytest.approx(10 / 16, abs=1e-3)  # rank / width, as stated
    # ridge 0: allowed at full rank (the same numbers: no ridge was added anyway) ...
    full = layerscope.alignment(p, method="cca", layers="full", progress=False)
    none = layerscope.alignment(p, method="cca", layers="full", ridge=0, progress=False)
    assert none.values.tolist() == full.values.tolist() == [[pytest.approx(1.0, abs=1e-12)]]
    assert main(["align", str(p), "--method", "cca", "--layers", "full", "--ridge", "0"]) == 0
    assert "every covariance has full rank" in capsys.readouterr().out
    # ... and a clear error where a covariance is singular
    err = _fail(["align", str(p), "--method", "cca", "--ridge", "0"], capsys)
    assert '"low"' in err and "rank 10 of width 16" in err


def test_procrustes_cosine_figure_matches_the_table(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    base = rng.standard_normal((300, 20))
    a, b = tmp_path / "model-a", tmp_path / "model-b"
    layerscope.write_store(a, {f"l{i}": base + i * rng.standard_normal((300, 20))
                               for i in range(3)})
    layerscope.write_store(b, {f"l{i}": base @ rng.standard_normal((20, 20)) + 2 * i *
                               rng.standard_normal((300, 20)) for i in range(3)},
                           metadata={"model": "org/model-b"})
    res = layerscope.alignment(a, b, method="procrustes", progress=False)
    assert res.meta["sides"] == ["model-a", "org/model-b"]
    fig = res.plot_cosines()
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 3
    for line, text in zip(lines, ax.get_legend().get_texts()):
        label = text.get_text()
        assert label.startswith("model-a: l") and " / org/model-b: l" in label
        r, c = label.replace("model-a: ", "").split(" / org/model-b: ")
        assert line.get_ydata()[-1] == pytest.approx(res[r, c], abs=1e-12)
        assert c == res.cols[int(np.argmax(res.values[res.rows.index(r)]))]
