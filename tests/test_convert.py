"""``layerscope.convert``: the dumps of other tools and scripts, written here in each format
the way those tools write them, converted and compared row by row with the source; masks,
multi-file order, ragged prompts, bf16, a memory-mapped .npy larger than the address-space
limit, HDF5, a SAELens-style ``datasets`` cache; failures and kills leave nothing at ``out``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import layerscope
import numpy as np
import pytest
from layerscope.capture.rowids import index_row_ids
from layerscope.cli import main
from layerscope.errors import FormatError, MismatchError, StoreExistsError

RNG = np.random.default_rng(11)


def _tokens(a: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The rows a token dump [B, T, d] gives: kept tokens in (sample, position) order."""
    keep = np.ones(a.shape[:2], bool) if mask is None else mask != 0
    return a[keep]


def _ids(mask: np.ndarray, sample0: int = 0) -> np.ndarray:
    b, t = np.nonzero(mask != 0)
    return index_row_ids(b + sample0, t)


def _no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if ".convert-" in p.name or ".old-" in p.name]


def test_safetensors_token_dump_with_attention_mask(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    B, T, d = 4, 6, 5
    x = {f"blocks.{i}.hook_resid_post": RNG.standard_normal((B, T, d)).astype(np.float32)
         for i in range(3)}
    mask = (np.arange(T)[None] < np.array([6, 2, 4, 1])[:, None]).astype(np.int64)
    save_file({**x, "attention_mask": mask}, str(tmp_path / "dump.safetensors"))
    st = layerscope.convert(tmp_path / "dump.safetensors", tmp_path / "s", progress=False)
    assert st.layers == list(x) and st.num_rows == int(mask.sum())
    for name, a in x.items():
        np.testing.assert_array_equal(st.read(name), _tokens(a, mask))
    np.testing.assert_array_equal(st.row_ids(), _ids(mask))
    b, t = np.nonzero(mask)
    np.testing.assert_array_equal(st.column("__sample__"), b)
    np.testing.assert_array_equal(st.column("__position__"), t)
    meta = st.metadata["converted_from"]
    assert meta["format"] == "safetensors" and meta["mask"] is None  # found by name
    _no_leftovers(tmp_path)


def test_many_files_are_consecutive_row_blocks_in_natural_order(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    blocks = {}
    for i in (1, 2, 10):  # a glob sorted as text would put batch-10 second
        blocks[i] = {"a": RNG.standard_normal((3, 4)), "b": RNG.standard_normal((3, 2))}
        save_file(blocks[i], str(tmp_path / f"batch-{i}.safetensors"))
    st = layerscope.convert(str(tmp_path / "batch-*.safetensors"), tmp_path / "s",
                            progress=False, layers="a")
    assert st.layers == ["a"] and st.dtypes["a"] == "float64"
    np.testing.assert_array_equal(st.read("a", dtype=np.float64), np.concatenate([blocks[i]["a"]
                                                                for i in (1, 2, 10)]))
    np.testing.assert_array_equal(st.column("__sample__"), np.arange(9))
    np.testing.assert_array_equal(st.column("__position__"), np.full(9, -1))
    np.testing.assert_array_equal(st.row_ids(), index_row_ids(np.arange(9), np.full(9, -1)))


def test_ragged_per_prompt_safetensors_in_bf16(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    lengths = [5, 1, 3]
    layers = {}
    for name in ("layer_3", "layer_7"):
        prompts = [torch.randn(1, n, 4, generator=torch.Generator().manual_seed(n)).to(
            torch.bfloat16) for n in lengths]
        save_file({str(i): p for i, p in enumerate(prompts)}, str(tmp_path / f"{name}.safetensors"))
        layers[name] = torch.cat([p[0] for p in prompts]).float().numpy()
    st = layerscope.convert([tmp_path / "layer_3.safetensors", tmp_path / "layer_7.safetensors"],
                            tmp_path / "s", progress=False)
    assert st.layers == ["layer_3", "layer_7"] and st.dtypes["layer_3"] == "bfloat16"
    for name, want in layers.items():
        np.testing.assert_array_equal(st.read(name), want)  # bf16 stored bit-exactly
    np.testing.assert_array_equal(st.column("__sample__"), np.repeat([0, 1, 2], lengths))
    np.testing.assert_array_equal(st.column("__position__"), [0, 1, 2, 3, 4, 0, 0, 1, 2])


def test_npy_per_layer_and_npz_batches_with_a_mask(tmp_path: Path) -> None:
    a = RNG.standard_normal((10, 3)).astype(np.float16)
    b = RNG.standard_normal((10, 6)).astype(np.float16)
    np.save(tmp_path / "emb.npy", a)
    np.save(tmp_path / "mlp.npy", b)
    st = layerscope.convert(tmp_path, tmp_path / "s", progress=False)  # a folder of .npy
    assert st.layers == ["emb", "mlp"] and st.dtypes["emb"] == "float16"
    np.testing.assert_array_equal(st.read("mlp").astype(np.float16), b)
    # npz: {"feats": [B, T, d], "mask": [B, T]} per batch, the mask named explicitly
    feats, masks = [], []
    for i in range(3):
        feats.append(RNG.standard_normal((2, 4, 3)))
        masks.append(RNG.integers(0, 2, (2, 4)))
        np.savez(tmp_path / f"part{i}.npz", feats=feats[-1], valid=masks[-1])
    st = layerscope.convert([tmp_path / f"part{i}.npz" for i in range(3)], tmp_path / "z",
                            mask="valid", progress=False)
    assert st.layers == ["feats"]
    np.testing.assert_array_equal(st.read("feats", dtype=np.float64), np.concatenate(
        [_tokens(f, m) for f, m in zip(feats, masks)]))
    np.testing.assert_array_equal(st.row_ids(), np.concatenate(
        [_ids(m, 2 * i) for i, m in enumerate(masks)]))


def test_npy_larger_than_the_address_space_limit(tmp_path: Path) -> None:
    big = np.lib.format.open_memmap(tmp_path / "wide.npy", mode="w+", dtype=np.float32,
                                    shape=(262144, 1024))  # 1 GiB, sparse on disk
    big[::4097] = np.arange(1024, dtype=np.float32)
    big.flush()
    del big
    code = (
        "import resource, numpy as np, layerscope as ls, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1000 << 20, 1000 << 20))\n"
        "st = ls.convert(sys.argv[1], sys.argv[2], progress=False, dtype='float16')\n"
        "x = st.take('wide', np.arange(0, 262144, 4097))\n"
        "assert st.num_rows == 262144 and (x == np.arange(1024)).all()\n"
        "assert (st.take('wide', [1, 4098])[:, :5] == 0).all()\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "wide.npy"),
                        str(tmp_path / "s")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    assert (tmp_path / "wide.npy").stat().st_size > 1000 << 20  # the limit the child ran under


def test_hdf5_datasets_in_groups(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    want: dict[str, list[np.ndarray]] = {"model/layer0": [], "model/layer1": []}
    for i in range(2):
        with h5py.File(tmp_path / f"acts_{i}.h5", "w") as f:
            for name in want:
                a = RNG.standard_normal((5, 3)).astype(np.float32)
                f.create_dataset(name, data=a)
                want[name].append(a)
    st = layerscope.convert(str(tmp_path / "acts_*.h5"), tmp_path / "s", progress=False)
    assert st.layers == list(want)
    for name, parts in want.items():
        np.testing.assert_array_equal(st.read(name), np.concatenate(parts))


def test_saelens_style_datasets_cache(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    from datasets import Array2D, Dataset, Features, Sequence, Value

    ctx, d, n = 8, 6, 11
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    feats = Features({**{h: Array2D(shape=(ctx, d), dtype="float32") for h in hooks},
                      "token_ids": Sequence(Value("int32"), length=ctx)})
    data = {h: RNG.standard_normal((n, ctx, d)).astype(np.float32) for h in hooks}
    tokens = RNG.integers(0, 50000, (n, ctx)).astype(np.int32)
    ds = Dataset.from_dict({**{h: list(v) for h, v in data.items()},
                            "token_ids": [list(t) for t in tokens]}, features=feats)
    ds.save_to_disk(str(tmp_path / "cache"), num_shards=3)
    assert datasets is not None
    st = layerscope.convert(tmp_path / "cache", tmp_path / "s", progress=False)
    assert st.layers == hooks and st.num_rows == n * ctx
    for h in hooks:
        np.testing.assert_array_equal(st.read(h), data[h].reshape(-1, d))
    np.testing.assert_array_equal(st.column("__token_id__"), tokens.reshape(-1))
    np.testing.assert_array_equal(st.column("__position__"), np.tile(np.arange(ctx), n))
    assert st.metadata["converted_from"]["format"] == "arrow"


def test_refusals_name_the_file_and_leave_nothing(tmp_path: Path) -> None:
    np.save(tmp_path / "ok.npy", np.zeros((4, 2)))
    (tmp_path / "acts.pkl").write_bytes(b"\x80\x04not really")
    with pytest.raises(FormatError, match=r"acts\.pkl: pickle files are not read"):
        layerscope.convert(tmp_path / "acts.pkl", tmp_path / "s", progress=False)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FormatError, match=r"notes\.txt: not a format .* safetensors, npy"):
        layerscope.convert(tmp_path / "notes.txt", tmp_path / "s", progress=False)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FormatError, match="object array"):
        layerscope.convert(tmp_path / "obj.npy", tmp_path / "s", progress=False)
    # a bad second batch: nothing at out, no temporary folder left
    np.savez(tmp_path / "b1.npz", x=np.ones((3, 2)))
    np.savez(tmp_path / "b2.npz", x=np.ones((3, 5)))
    with pytest.raises(Exception, match="b2.npz|width|dim"):
        layerscope.convert([tmp_path / "b1.npz", tmp_path / "b2.npz"], tmp_path / "s",
                           progress=False)
    np.savez(tmp_path / "b3.npz", y=np.ones((3, 2)))
    with pytest.raises(MismatchError, match=r"b3\.npz: no layer 'x'"):
        layerscope.convert([tmp_path / "b1.npz", tmp_path / "b3.npz"], tmp_path / "s",
                           progress=False)
    assert not (tmp_path / "s").exists()
    _no_leftovers(tmp_path)
    # an existing store is refused before anything is read
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "keep").write_text("x")
    with pytest.raises(StoreExistsError, match="--overwrite"):
        layerscope.convert(tmp_path / "ok.npy", tmp_path / "s", progress=False)
    st = layerscope.convert(tmp_path / "ok.npy", tmp_path / "s", progress=False, overwrite=True)
    assert st.num_rows == 4 and not (tmp_path / "s" / "keep").exists()
    _no_leftovers(tmp_path)


def test_a_conversion_killed_midway_leaves_nothing(tmp_path: Path) -> None:
    for i in range(4):
        np.savez(tmp_path / f"b{i}.npz", x=np.ones((50, 8)))
    code = (
        "import os, signal, sys, layerscope as ls\n"
        "def cb(done, total):\n"
        "    if done >= 100: os.kill(os.getpid(), signal.SIGKILL)\n"
        "ls.convert(sys.argv[1:-1], sys.argv[-1], progress=cb)\n")
    r = subprocess.run([sys.executable, "-c", code, *[str(tmp_path / f"b{i}.npz")
                                                      for i in range(4)], str(tmp_path / "s")])
    assert r.returncode == -signal.SIGKILL
    assert not (tmp_path / "s").exists()


def test_cli_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "a.npz", h=np.arange(12.0).reshape(2, 3, 2),
             attention_mask=np.array([[1, 1, 0], [1, 0, 0]]))
    assert main(["convert", str(tmp_path / "a.npz"), "-o", str(tmp_path / "s")]) == 0
    cap = capsys.readouterr()
    assert "read as npz" in cap.err and "wrote 3 rows x 1 layers" in cap.out
    assert main(["convert", str(tmp_path / "a.npz"), "-o", str(tmp_path / "s"), "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nope*.npz"), "-o", str(tmp_path / "t")]) == 2
    assert "matches no file" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "s"]


@pytest.mark.parametrize("damage", ["truncated", "header", "offsets", "dtype"])
def test_malformed_safetensors_is_a_format_error(tmp_path: Path, damage: str) -> None:
    import json
    import struct

    from safetensors.numpy import save_file

    p = tmp_path / "x.safetensors"
    save_file({"a": np.ones((4, 3), np.float32)}, str(p))
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8:8 + n])
    if damage == "truncated":
        raw = raw[:-8]
    elif damage == "header":
        raw = struct.pack("<Q", 1 << 40) + raw[8:]
    else:
        if damage == "offsets":
            head["a"]["data_offsets"] = [0, 1 << 30]
        else:
            head["a"]["dtype"] = "C64"
        text = json.dumps(head).encode()
        raw = struct.pack("<Q", len(text)) + text + raw[8 + n:]
    p.write_bytes(raw)
    with pytest.raises(FormatError, match=r"x\.safetensors"):
        layerscope.convert(p, tmp_path / "s", progress=False, format="safetensors")
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- torch dumps


class _Payload:
    """What a malicious pickle does on load: write a file (here: a marker)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_hf_hidden_states_in_every_layout(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    B, T, d, L = 3, 5, 4, 3
    hs = tuple(torch.randn(B, T, d) for _ in range(L + 1))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    torch.save({"hidden_states": hs, "attention_mask": mask}, tmp_path / "dict.pt")
    st = layerscope.convert(tmp_path / "dict.pt", tmp_path / "a", progress=False)
    assert st.layers == ["embeddings", "layer.0", "layer.1", "layer.2"]
    for name, h in zip(st.layers, hs):
        np.testing.assert_array_equal(st.read(name), _tokens(h.numpy(), mask.numpy()))
    assert st.metadata["converted_from"]["format"] == "torch"
    # a bare tuple of pooled [N, d] tensors, in bf16, over two files
    pooled = [tuple(torch.randn(6, d).to(torch.bfloat16) for _ in range(L + 1)) for _ in range(2)]
    for i, p in enumerate(pooled):
        torch.save(p, tmp_path / f"pooled-{i}.pt")
    st = layerscope.convert(str(tmp_path / "pooled-*.pt"), tmp_path / "b", progress=False,
                            format="hf-hidden-states")
    assert st.num_rows == 12 and st.dtypes["layer.2"] == "bfloat16"
    np.testing.assert_array_equal(st.read("layer.2"), torch.cat(
        [p[3] for p in pooled]).float().numpy())
    # stacked [L+1, N, d] and [N, L+1, d]: the layer axis is the shorter one
    stack = torch.randn(L + 1, 9, d)
    torch.save(stack, tmp_path / "s1.pt")
    torch.save(stack.transpose(0, 1).contiguous(), tmp_path / "s2.pt")
    for name in ("s1", "s2"):
        st = layerscope.convert(tmp_path / f"{name}.pt", tmp_path / f"o-{name}", progress=False)
        np.testing.assert_array_equal(st.read("layer.1"), stack[2].numpy())
    torch.save(torch.randn(4, 4, d), tmp_path / "square.pt")
    with pytest.raises(FormatError, match="ambiguous"):
        layerscope.convert(tmp_path / "square.pt", tmp_path / "sq", progress=False)


def test_transformerlens_cache_files(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    B, T, d, H = 2, 4, 8, 2
    caches = []
    for i in range(2):
        cache = {"hook_embed": torch.randn(B, T, d),
                 "blocks.0.hook_resid_post": torch.randn(B, T, d),
                 "blocks.0.attn.hook_z": torch.randn(B, T, H, d // H),
                 "blocks.0.attn.hook_pattern": torch.randn(B, H, T, T)}
        torch.save(cache, tmp_path / f"cache_{i}.pt")
        caches.append(cache)
    st = layerscope.convert(str(tmp_path / "cache_*.pt"), tmp_path / "s", progress=False,
                            format="tl-cache")
    assert st.layers == ["hook_embed", "blocks.0.hook_resid_post", "blocks.0.attn.hook_z"]
    assert st.num_rows == 2 * B * T
    np.testing.assert_array_equal(st.read("blocks.0.attn.hook_z"), np.concatenate(
        [c["blocks.0.attn.hook_z"].reshape(B * T, d).numpy() for c in caches]))
    np.testing.assert_array_equal(st.column("__sample__"), np.repeat(np.arange(4), T))
    with pytest.raises(FormatError, match="not hf-hidden-states"):
        layerscope.convert(tmp_path / "cache_0.pt", tmp_path / "x", progress=False,
                           format="hf-hidden-states")


def test_a_malicious_pt_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned.txt"
    # the payload really does run under plain unpickling (what torch.load did by default)
    import pickle

    pickle.loads(pickle.dumps(_Payload(str(marker))))  # noqa: S301 - the test's own object
    assert marker.read_text() == "pwned"
    marker.unlink()
    torch.save({"layer": torch.randn(3, 2), "evil": _Payload(str(marker))}, tmp_path / "x.pt")
    with pytest.raises(FormatError, match=r"x\.pt: refused: .*arbitrary unpickling"):
        layerscope.convert(tmp_path / "x.pt", tmp_path / "s", progress=False)
    assert not marker.exists() and not (tmp_path / "s").exists()
    _no_leftovers(tmp_path)


def test_no_code_from_user_files_anywhere_in_the_package() -> None:
    """No pickle loads, no np.load with pickles, no eval/exec (a model's ``.eval()`` is not
    one), and every torch.load with weights_only=True, in every module of the package."""
    import re

    root = Path(layerscope.__file__).parent
    banned = re.compile(r"pickle\.loads?\(|allow_pickle\s*=\s*True|(?<![.\w`])eval\("
                        r"|(?<![.\w`])exec\(|marshal\.loads|shelve\.open|yaml\.load\(|dill\.|cloudpickle\.")
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not banned.search(text), f"{path}: {banned.search(text).group(0)}"
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), f"{path}: {call.group(0)}"
