"""Tests of the torch hook exporter (layerscope.capture) on real and locally built models."""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import layerscope  # noqa: E402
from layerscope import CaptureError, LayerscopeError, MismatchError  # noqa: E402
from layerscope._source import check_comparable, resolve  # noqa: E402
from layerscope.capture import Capture, capture, resolve_layers  # noqa: E402
from layerscope.corpus import stdlib_corpus  # noqa: E402
from layerscope.models import load_minilm, minilm_random, small_cnn, tiny_gpt2  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a small, shared CI machine OpenMP spinning of 2+ threads makes
    these tiny forward passes 10x slower (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def minilm():
    model, tok = load_minilm()
    return model, tok


@pytest.fixture(scope="module")
def texts():
    return stdlib_corpus(10, max_chars=120, seed=3)


def _batches(tok, texts, bs=4, side="right"):
    tok.padding_side = side
    try:
        return [
            tok(texts[i : i + bs], padding=True, return_tensors="pt")
            for i in range(0, len(texts), bs)
        ]
    finally:
        tok.padding_side = "right"


def _no_hooks(model):
    """No hook of ours is left (transformers installs hooks of its own)."""
    for name, m in model.named_modules():
        for fn in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]:
            assert not getattr(fn, "__module__", "").startswith("layerscope.capture"), (name, fn)


def _read(store, layer):
    return store.read(layer, 0, store.num_rows, dtype=np.float32)


# --------------------------------------------------------------------------- MiniLM
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_minilm_tokens_equal_hidden_states(minilm, texts, tmp_path, dtype):
    model, tok = minilm
    batches = _batches(tok, texts)
    ref = {i: [] for i in range(6)}
    samples, positions = [], []
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    with (
        torch.inference_mode(),
        capture(model, layers="encoder.layer.*", out=tmp_path / "s", dtype=dtype) as cap,
    ):
        start = 0
        for enc in batches:
            out = model(**enc, output_hidden_states=True)
            m = enc["attention_mask"].bool()
            for i in range(6):
                ref[i].append(out.hidden_states[i + 1][m].to(tdt).float().numpy())
            for b in range(m.shape[0]):
                k = int(m[b].sum())
                samples += [start + b] * k
                positions += list(range(k))
            start += m.shape[0]
    _no_hooks(model)
    st = cap.store
    assert st.layers == [f"encoder.layer.{i}" for i in range(6)]
    assert st.num_rows == len(samples)
    for i in range(6):
        got = _read(st, f"encoder.layer.{i}")
        np.testing.assert_array_equal(got, np.concatenate(ref[i]))
    np.testing.assert_array_equal(st.column("__sample__"), samples)
    np.testing.assert_array_equal(st.column("__position__"), positions)
    meta = st.metadata["capture"]
    assert meta["pool"] == "tokens" and meta["dtype"] == dtype
    assert meta["model_class"].endswith("BertModel")
    assert meta["layers"]["encoder.layer.0"]["dim"] == 384
    assert "torch" in meta["versions"] and "transformers" in meta["versions"]


def _torch_pool(h, m, pool):
    m = m.bool()
    if pool == "mean":
        w = m.float().unsqueeze(-1)
        return (h * w).sum(1) / w.sum(1)
    out = []
    for b in range(h.shape[0]):
        idx = torch.nonzero(m[b]).squeeze(1)
        out.append(h[b, idx[0] if pool == "first" else idx[-1]])
    return torch.stack(out)


@pytest.mark.parametrize(
    "pool,side",
    [("mean", "right"), ("last", "right"), ("last", "left"), ("first", "left"), ("mean", "left")],
)
def test_minilm_pooling(minilm, texts, tmp_path, pool, side):
    model, tok = minilm
    batches = _batches(tok, texts, side=side)
    if side == "left":  # the batch really is left padded
        assert (batches[0]["attention_mask"][:, 0] == 0).any()
    refs = {i: [] for i in (0, 3)}
    with (
        torch.inference_mode(),
        capture(
            model,
            layers=["encoder.layer.0", "encoder.layer.3"],
            out=tmp_path / "s",
            pool=pool,
            dtype="float32",
        ) as cap,
    ):
        for enc in batches:
            out = model(**enc, output_hidden_states=True)
            for i in refs:
                refs[i].append(_torch_pool(out.hidden_states[i + 1], enc["attention_mask"], pool))
    st = cap.store
    assert st.num_rows == len(texts)
    for i in refs:
        np.testing.assert_allclose(
            _read(st, f"encoder.layer.{i}"), torch.cat(refs[i]).numpy(), rtol=1e-5, atol=1e-5
        )
    np.testing.assert_array_equal(st.column("__sample__"), np.arange(len(texts)))


def test_row_ids_two_models_and_different_inputs(minilm, texts, tmp_path):
    model, tok = minilm
    other = minilm_random(seed=1)
    with torch.inference_mode():
        with capture(model, layers="encoder.layer.*", out=tmp_path / "a") as ca:
            for enc in _batches(tok, texts, bs=4):
                model(**enc)
        # another model, another batch size (so other padding), same inputs in the same order
        with capture(other, layers=["encoder.layer.2"], out=tmp_path / "b", pool="tokens") as cb:
            for enc in _batches(tok, texts, bs=3, side="left"):
                other(**enc)
        # different inputs, same shapes of batches
        changed = list(texts)
        changed[5] = changed[5].replace("e", "a", 1) if "e" in changed[5] else changed[5] + " x"
        with capture(model, layers="encoder.layer.0", out=tmp_path / "c") as cc:
            for enc in _batches(tok, changed, bs=4):
                model(**enc)
    a, b, c = ca.store, cb.store, cc.store
    np.testing.assert_array_equal(a.row_ids(), b.row_ids())
    assert len(np.unique(a.row_ids())) == a.num_rows  # no collisions at this size
    check_comparable(resolve(a), resolve(b))
    with pytest.raises(MismatchError):
        check_comparable(resolve(a), resolve(c))
    # the rows before the changed sample are unaffected
    first_bad = int(np.flatnonzero(a.row_ids()[: c.num_rows] != c.row_ids()[: a.num_rows])[0])
    assert a.column("__sample__")[first_bad] == 5


def test_index_row_ids_and_user_sample_ids(minilm, texts, tmp_path):
    model, tok = minilm
    ids = [1000 + 7 * i for i in range(len(texts))]
    with (
        torch.inference_mode(),
        capture(
            model,
            layers="encoder.layer.5",
            out=tmp_path / "s",
            pool="mean",
            row_ids="index",
            sample_ids=ids,
        ) as cap,
    ):
        for enc in _batches(tok, texts):
            model(**enc)
    st = cap.store
    np.testing.assert_array_equal(st.column("__sample__"), ids)
    np.testing.assert_array_equal(st.row_ids(), np.asarray(ids) * 2**20)  # position -1 + 1 = 0
    # per-batch ids
    with (
        torch.inference_mode(),
        capture(
            model, layers="encoder.layer.5", out=tmp_path / "t", pool="first", row_ids="index"
        ) as cap2,
    ):
        enc = _batches(tok, texts[:3])[0]
        cap2.set_sample_ids([5, 6, 7])
        model(**enc)
        with pytest.raises(CaptureError, match="sample ids"):
            cap2.set_sample_ids([1])
            model(**enc)
    np.testing.assert_array_equal(cap2.store.row_ids(), np.array([5, 6, 7]) * 2**20 + 1)


def test_where_input_and_explicit_mask(minilm, texts, tmp_path):
    model, tok = minilm
    enc = _batches(tok, texts[:4])[0]
    with torch.inference_mode():
        out = model(**enc, output_hidden_states=True)
        with capture(
            model, layers="encoder.layer.1", where="input", out=tmp_path / "s", dtype="float32"
        ) as cap:
            model(**enc)
        # explicit mask: calling a submodule directly (no top-level call, no automatic mask)
        with capture(
            model,
            layers=["encoder.layer.1", "encoder.layer.2"],
            out=tmp_path / "t",
            dtype="float32",
        ) as cap2:
            cap2.mask(enc["attention_mask"])
            model.encoder(out.hidden_states[0])  # a submodule call: batch ends at exit
    m = enc["attention_mask"].bool()
    np.testing.assert_array_equal(
        _read(cap.store, "encoder.layer.1"), out.hidden_states[1][m].numpy()
    )
    assert cap2.store.num_rows == int(m.sum())


def test_bad_pattern_lists_closest_names(minilm, tmp_path):
    model, _ = minilm
    with pytest.raises(CaptureError, match="encoder.layer") as ei:
        capture(model, layers="encoder.layers.*", out=tmp_path / "s")
    assert isinstance(ei.value, LayerscopeError)
    assert "closest" in str(ei.value)
    assert not os.path.exists(tmp_path / "s")
    # dotted glob: * stays inside a segment, ** crosses
    assert resolve_layers(model, "encoder.layer.*") == [f"encoder.layer.{i}" for i in range(6)]
    assert len(resolve_layers(model, "encoder.layer.**")) > 6
    assert (
        resolve_layers(model, lambda n, m: n.endswith("output.dense"))[0]
        == "encoder.layer.0.attention.output.dense"
    )
    # store order = module order, whatever the order of the patterns
    assert resolve_layers(model, ["encoder.layer.3", "embeddings"]) == [
        "embeddings",
        "encoder.layer.3",
    ]


def test_exception_inside_block_leaves_valid_store(minilm, texts, tmp_path):
    model, tok = minilm
    batches = _batches(tok, texts)
    cap = capture(model, layers="encoder.layer.*", out=tmp_path / "s")
    with pytest.raises(ZeroDivisionError), torch.inference_mode(), cap:
        model(**batches[0])
        model(**batches[1])
        raise ZeroDivisionError("inside the block")
    _no_hooks(model)
    n = int(batches[0]["attention_mask"].sum() + batches[1]["attention_mask"].sum())
    assert cap.store.num_rows == n
    reopened = layerscope.open(tmp_path / "s")
    assert reopened.num_rows == n and len(reopened.layers) == 6
    # left through an exception: the rows are kept, the store says it is not the whole
    # capture (docs/FORMAT.md)
    assert not reopened.complete


def test_ctrl_c_inside_block_marks_the_store_incomplete(minilm, texts, tmp_path):
    model, tok = minilm
    batches = _batches(tok, texts)
    for trial in range(3):
        out = tmp_path / f"s{trial}"
        with pytest.raises(KeyboardInterrupt), torch.inference_mode(), \
                capture(model, layers="encoder.layer.*", out=out) as cap:
            model(**batches[0])
            raise KeyboardInterrupt
        st = layerscope.open(out)
        assert st.num_rows == int(batches[0]["attention_mask"].sum()) == cap.store.num_rows
        assert not st.complete
    with torch.inference_mode(), capture(model, layers="encoder.layer.*",
                                         out=tmp_path / "ok") as cap:
        model(**batches[0])
    assert layerscope.open(tmp_path / "ok").complete


def test_exception_inside_forward_drops_only_the_partial_batch(minilm, texts, tmp_path):
    """An error in the middle of a forward pass (after some selected layers fired): the
    batches before it are stored, the half-captured one is not, the error propagates."""
    model, tok = minilm
    batches = _batches(tok, texts[:6], bs=2)
    calls = []

    def boom(module, args, output):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory (simulated)")

    user_hook = model.encoder.layer[3].register_forward_hook(boom)
    try:
        with (
            pytest.raises(RuntimeError, match="simulated") as ei,
            torch.inference_mode(),
            capture(model, layers="encoder.layer.*", out=tmp_path / "s", dtype="float32") as cap,
        ):
            for enc in batches:
                model(**enc)
    finally:
        user_hook.remove()
    _no_hooks(model)
    notes = " ".join(getattr(ei.value, "__notes__", []))
    assert "holds the" in notes and "rows" in notes
    st = layerscope.open(tmp_path / "s", verify=True)
    n = int(batches[0]["attention_mask"].sum() + batches[1]["attention_mask"].sum())
    assert st.num_rows == n and cap.store.num_rows == n
    with torch.inference_mode():
        want = np.concatenate(
            [
                model(**enc, output_hidden_states=True)
                .hidden_states[6][enc["attention_mask"].bool()]
                .numpy()
                for enc in batches[:2]
            ]
        )
    np.testing.assert_array_equal(_read(st, "encoder.layer.5"), want)


def test_max_rows(minilm, texts, tmp_path):
    model, tok = minilm
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with (
            torch.inference_mode(),
            capture(model, layers="encoder.layer.0", out=tmp_path / "s", max_rows=37) as cap,
        ):
            for enc in _batches(tok, texts, bs=2) * 3:
                model(**enc)
    assert cap.store.num_rows == 37
    assert sum("max_rows" in str(x.message) for x in w) == 1


def test_writer_error_propagates(minilm, texts, tmp_path):
    model, tok = minilm
    batches = _batches(tok, texts, bs=2)

    class Boom(Exception):
        pass

    cap = capture(model, layers="encoder.layer.0", out=tmp_path / "s", queue_size=1)

    def bad_append(*a, **k):
        raise Boom("disk on fire")

    cap._out._append = bad_append
    with pytest.raises(CaptureError, match="disk on fire"), torch.inference_mode(), cap:
        for enc in batches * 4:
            model(**enc)
    _no_hooks(model)


def test_back_pressure_bounded_queue(minilm, texts, tmp_path):
    """A writer that cannot keep up blocks the model: at most queue_size batches wait in the
    queue plus the one being written; the producer never runs further ahead."""
    model, tok = minilm
    enc = _batches(tok, texts[:2])[0]
    release = threading.Event()
    entered = threading.Event()
    cap = capture(model, layers="encoder.layer.0", out=tmp_path / "s", queue_size=2)
    real = cap._out._append

    def slow_append(*a, **k):
        entered.set()
        assert release.wait(60)
        real(*a, **k)

    cap._out._append = slow_append
    done = []

    def producer():
        with torch.inference_mode():
            for _ in range(8):
                model(**enc)
                done.append(1)

    with cap:
        t = threading.Thread(target=producer)
        t.start()
        assert entered.wait(60)
        # wait until the producer is stuck: queue full and no progress possible
        for _ in range(6000):
            if cap._out.queue.full() and len(done) == 3:
                break
            threading.Event().wait(0.01)
        # 1 batch in the writer + 2 queued are done; the 4th forward is blocked in put()
        assert cap._out.queue.full() and cap._out.queue.qsize() == 2
        assert len(done) == 3
        release.set()
        t.join(60)
    assert len(done) == 8
    assert cap.store.num_rows == 8 * int(enc["attention_mask"].sum())


# --------------------------------------------------------------------------- GPT-2, CNN
def test_gpt2_tuple_outputs_and_kv_cache(tmp_path):
    """GPT-2 (transformers 5): blocks return tensors, attention returns (out, weights), the
    model returns a tuple with the KV cache. Note that HF's ``hidden_states[-1]`` is taken
    *after* the final LayerNorm ``ln_f``: it is the output of ``transformer.ln_f`` (and of
    ``transformer``), not of the last block ``transformer.h.{n-1}``."""
    model = tiny_gpt2(seed=0, n_layer=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    layers = ["transformer.h.*", "transformer.h.*.attn", "transformer.ln_f", "transformer"]
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        with capture(model, layers=layers, out=tmp_path / "s", dtype="float32") as cap:
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, return_dict=False)
        assert isinstance(out, tuple) and out[1] is not None  # KV cache in the outputs
        with capture(
            model,
            layers="transformer.h.0.attn",
            out=tmp_path / "t",
            dtype="float32",
            output=lambda o: o[0],
        ) as cap2:
            model(input_ids=ids, attention_mask=mask)
        with (
            pytest.raises(CaptureError, match="not a tensor"),
            capture(model, layers="transformer.h.0.attn", out=tmp_path / "u", output=1),
        ):
            model(input_ids=ids, attention_mask=mask)  # attention weights are None here
        # a ModelOutput selected by key
        with capture(
            model,
            layers="transformer",
            output="last_hidden_state",
            pool="last",
            out=tmp_path / "k",
            dtype="float32",
        ) as ck:
            model(input_ids=ids, attention_mask=mask)
    _no_hooks(model)
    st = cap.store
    m = mask.bool()
    assert st.layers == [
        "transformer",
        "transformer.h.0",
        "transformer.h.0.attn",
        "transformer.h.1",
        "transformer.h.1.attn",
        "transformer.h.2",
        "transformer.h.2.attn",
        "transformer.ln_f",
    ]
    assert st.num_rows == int(m.sum())
    hs = [h[m].numpy() for h in ref.hidden_states]
    for i in range(2):  # blocks before the last one: hidden_states[i + 1]
        np.testing.assert_allclose(_read(st, f"transformer.h.{i}"), hs[i + 1], rtol=1e-5, atol=1e-5)
    # hidden_states[-1] = ln_f(last block); the last block itself is different
    np.testing.assert_allclose(_read(st, "transformer.ln_f"), hs[3], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(_read(st, "transformer"), _read(st, "transformer.ln_f"))
    last = torch.from_numpy(_read(st, "transformer.h.2"))
    np.testing.assert_allclose(
        model.transformer.ln_f(last).detach().numpy(), hs[3], rtol=1e-4, atol=1e-4
    )
    assert not np.allclose(last.numpy(), hs[3], atol=1e-2)
    np.testing.assert_array_equal(
        _read(cap2.store, "transformer.h.0.attn"), _read(st, "transformer.h.0.attn")
    )
    lens = m.sum(1)
    np.testing.assert_allclose(
        _read(ck.store, "transformer"),
        ref.hidden_states[3][torch.arange(3), lens - 1].numpy(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_gpt2_incremental_decoding_with_kv_cache(tmp_path):
    """A decoding step with ``past_key_values``: the attention mask covers past + new tokens,
    the layer outputs only the new ones; the capture takes the mask's last columns."""
    model = tiny_gpt2(seed=1)
    ids = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding, as for generation
    nxt = torch.tensor([[5], [7]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    with torch.inference_mode():
        full = model(
            input_ids=torch.cat([ids, nxt], 1), attention_mask=mask2, output_hidden_states=True
        )
        with capture(
            model, layers="transformer.h.0", out=tmp_path / "s", dtype="float32", row_ids="index"
        ) as cap:
            past = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
            cap.set_sample_ids([0, 1])  # the decoding step continues samples 0 and 1
            model(input_ids=nxt, attention_mask=mask2, past_key_values=past, use_cache=True)
    st = cap.store
    got = _read(st, "transformer.h.0")
    m = mask.bool()
    assert st.num_rows == int(m.sum()) + 2
    np.testing.assert_allclose(got[-2:], full.hidden_states[1][:, -1].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        got[:-2], full.hidden_states[1][:, :6][m].numpy(), rtol=1e-4, atol=1e-4
    )
    # the decoding step's rows continue the samples: positions after their past tokens
    np.testing.assert_array_equal(st.column("__sample__"), [0] * 6 + [1] * 4 + [0, 1])
    np.testing.assert_array_equal(st.column("__position__"), [*range(6), *range(4), 6, 4])
    assert len(np.unique(st.row_ids())) == st.num_rows


def test_cnn_mean_and_positions(tmp_path):
    model = small_cnn(seed=0)
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        conv0 = model[0](x)  # the in-place ReLU after it must not leak into the capture
        conv2 = model[2](torch.relu(conv0))
        logits = model(x)
        with capture(
            model, layers=["0", "2", "6"], out=tmp_path / "m", pool="mean", dtype="float32"
        ) as cm:
            model(x[:3])
            model(x[3:])
        with capture(
            model, layers=["0"], out=tmp_path / "p", pool="positions", dtype="float32"
        ) as cp:
            model(x)
        with (
            pytest.raises(CaptureError, match="different numbers of rows"),
            capture(model, layers=["0", "6"], out=tmp_path / "q", pool="positions"),
        ):
            model(x)
    np.testing.assert_allclose(
        _read(cm.store, "0"), conv0.mean((2, 3)).numpy(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        _read(cm.store, "2"), conv2.mean((2, 3)).numpy(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(_read(cm.store, "6"), logits.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        _read(cp.store, "0"), conv0.permute(0, 2, 3, 1).reshape(-1, 8).numpy()
    )
    np.testing.assert_array_equal(cp.store.column("__position__"), np.tile(np.arange(64), 5))
    # float inputs: row ids follow the image bytes
    assert cp.store.num_rows == 320


def test_never_firing_hooks_and_nothing_ran(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.unused = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x)

    net = Net()
    with (
        pytest.raises(CaptureError, match="unused"),
        capture(net, layers=["a", "unused"], out=tmp_path / "s"),
    ):
        net(torch.randn(2, 4))
    _no_hooks(net)
    with (
        pytest.warns(UserWarning, match="no selected layer"),
        capture(net, layers="a", out=tmp_path / "t") as cap,
    ):
        pass
    assert cap.store is None


def test_grad_mode_and_compile(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(6, 4)
    with capture(net, layers=["0", "2"], out=tmp_path / "g", dtype="float32") as cap:
        y = net(x)
        y.sum().backward()  # capturing does not break autograd
    np.testing.assert_allclose(_read(cap.store, "2"), y.detach().numpy(), rtol=1e-6)
    compiled = torch.compile(net, backend="eager")
    compiled(x)  # compiled before the capture: the hooks are recompiled in
    with (
        pytest.warns(UserWarning, match="compiled"),
        capture(compiled, layers=["0", "2"], out=tmp_path / "c", dtype="float32") as cc,
    ):
        compiled(x)
    np.testing.assert_allclose(_read(cc.store, "2"), y.detach().numpy(), rtol=1e-6)
    _no_hooks(net)


def test_argument_errors(minilm, tmp_path):
    model, _ = minilm
    for kw in (
        {"pool": "max"},
        {"dtype": "int8"},
        {"where": "inside"},
        {"max_rows": 0},
        {"row_ids": "random"},
    ):
        with pytest.raises(LayerscopeError):
            capture(model, layers="encoder.layer.0", out=tmp_path / "s", **kw)
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "f").write_text("x")
    with pytest.raises(FileExistsError):
        with capture(model, layers="encoder.layer.0", out=tmp_path / "exists"):
            pass
    assert isinstance(capture(model, layers="encoder.layer.0", out=tmp_path / "z"), Capture)


def test_cli_capture(tmp_path, capsys):
    from layerscope.cli import main
    from layerscope.models import minilm_path

    texts = stdlib_corpus(7, max_chars=100, seed=5)
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n\n", encoding="utf-8")
    rc = main(
        [
            "capture",
            "--model",
            minilm_path(),
            "--texts",
            str(tmp_path / "texts.txt"),
            "--layers",
            "encoder.layer.*",
            "--layers",
            "embeddings",
            "--out",
            str(tmp_path / "s"),
            "--batch-size",
            "3",
            "--max-length",
            "16",
            "--pool",
            "mean",
            "--dtype",
            "float32",
        ]
    )
    io = capsys.readouterr()
    assert rc == 0, io.err
    assert "7/7" in io.err and "capture" in io.err  # the progress bar
    assert "wrote 7 rows x 7 layers" in io.out
    st = layerscope.open(tmp_path / "s")
    assert st.num_rows == 7 and st.layers[0] == "embeddings" and len(st.layers) == 7
    # the same as the API on the same batches
    model, tok = load_minilm()
    with torch.inference_mode():
        enc = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        h = model(**enc, output_hidden_states=True).hidden_states[6]
    np.testing.assert_allclose(
        _read(st, "encoder.layer.5"),
        _torch_pool(h, enc["attention_mask"], "mean").numpy(),
        rtol=1e-4,
        atol=1e-5,
    )
    assert st.metadata["user"]["max_length"] == 16
    # the stdlib corpus source, and a bad pattern: exit code 1 with the closest names
    rc = main(
        [
            "capture",
            "--model",
            minilm_path(),
            "--stdlib-corpus",
            "2",
            "--layers",
            "encoder.layers.*",
            "--out",
            str(tmp_path / "t"),
        ]
    )
    io = capsys.readouterr()
    assert rc == 2 and "closest names" in io.err and "'encoder.layer" in io.err
    # small shards by default (a full disk or a kill loses one small shard), or as asked
    from layerscope.cli import build_parser

    base = ["capture", "--model", "m", "--texts", "t", "--layers", "a", "--out", "o"]
    assert build_parser().parse_args(base).shard_mb == 16
    (tmp_path / "long.txt").write_text("\n".join(["many words " * 40] * 4), encoding="utf-8")
    rc = main(["capture", "--model", minilm_path(), "--texts", str(tmp_path / "long.txt"),
               "--layers", "encoder.layer.*", "--out", str(tmp_path / "u"), "--max-length",
               "64", "--dtype", "float32", "--shard-mb", "1"])
    assert rc == 0
    st = layerscope.open(tmp_path / "u")
    shards = [f for f in os.listdir(tmp_path / "u") if f.endswith(".safetensors")]
    row = 6 * 384 * 4 + 8  # bytes per row: six f32 layers and the row id
    assert st.num_rows == 4 * 64 and st.complete
    assert len(shards) == -(-st.num_rows // ((1 << 20) // row))  # shards of at most 1 MiB


def test_where_input_kv_projection_inputs(minilm, texts, tmp_path):
    """Inputs of the key projections (``where="input"``) of every layer = the hidden state
    entering that layer, masked, in module order."""
    model, tok = minilm
    batches = _batches(tok, texts[:6], bs=3)
    ref = {i: [] for i in range(6)}
    with (
        torch.inference_mode(),
        capture(
            model,
            layers="encoder.layer.*.attention.self.key",
            where="input",
            out=tmp_path / "s",
            dtype="float32",
        ) as cap,
    ):
        for enc in batches:
            out = model(**enc, output_hidden_states=True)
            m = enc["attention_mask"].bool()
            for i in range(6):
                ref[i].append(out.hidden_states[i][m].numpy())
    st = cap.store
    assert st.layers == [f"encoder.layer.{i}.attention.self.key" for i in range(6)]
    for i in range(6):
        np.testing.assert_array_equal(_read(st, st.layers[i]), np.concatenate(ref[i]))
    assert st.metadata["capture"]["where"] == "input"


def test_pool_none_keeps_padding(minilm, texts, tmp_path):
    model, tok = minilm
    batches = _batches(tok, texts[:5], bs=3)
    with (
        torch.inference_mode(),
        capture(
            model, layers="encoder.layer.4", pool="none", out=tmp_path / "s", dtype="float32"
        ) as cap,
    ):
        refs = [model(**enc, output_hidden_states=True).hidden_states[5] for enc in batches]
    st = cap.store
    want = np.concatenate([h.reshape(-1, 384).numpy() for h in refs])
    np.testing.assert_array_equal(_read(st, "encoder.layer.4"), want)
    pos = np.concatenate([np.tile(np.arange(h.shape[1]), h.shape[0]) for h in refs])
    np.testing.assert_array_equal(st.column("__position__"), pos)
    assert st.num_rows == sum(h.shape[0] * h.shape[1] for h in refs)


class _DictNet(torch.nn.Module):
    """Returns a dict; its inner block takes keyword inputs."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 6)

        def forward(self, x, *, bias=None, scale=1.0):
            return {"hidden": self.lin(x) * scale + bias, "aux": x.sum(-1)}

    def __init__(self):
        super().__init__()
        self.block = self.Block()
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        h = self.block(x, bias=torch.full_like(x, 0.5), scale=2.0)["hidden"]
        return {"logits": self.head(h), "hidden": h}


def test_dict_outputs_and_input_selection(tmp_path):
    net = _DictNet().eval()
    x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = net(x)
        lin = net.block.lin(x)
        kw = dict(out=tmp_path / "a", dtype="float32", pool="mean")
        # default: the first entry of a dict output
        with capture(net, layers=["block", "head"], **kw) as ca:
            net(x)
        def block(name: str, **options: object) -> object:
            with capture(net, layers="block", out=tmp_path / name, dtype="float32",
                         **options) as c:
                net(x)
            return c

        cb = block("b", output="aux")
        cc = block("c", output=lambda o: o["hidden"] - 1.0, pool="tokens")
        # inputs: positional index 0, a keyword, a callable on (args, kwargs)
        cd = block("d", where="input", output=0, pool="tokens")
        ce = block("e", where="input", output="bias", pool="tokens")
        ch = block("h", where="input", output=lambda a, k: a[0] * k["scale"], pool="last")
        with (
            pytest.raises(CaptureError, match="no keyword input 'nope'"),
            capture(net, layers="block", where="input", output="nope", out=tmp_path / "f"),
        ):
            net(x)
        with (
            pytest.raises(CaptureError, match="no key 'nope'"),
            capture(net, layers="block", output="nope", out=tmp_path / "g"),
        ):
            net(x)
    _no_hooks(net)
    np.testing.assert_allclose(_read(ca.store, "block"), ref["hidden"].mean(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(_read(ca.store, "head"), ref["logits"].mean(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(_read(cb.store, "block"), x.sum(-1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        _read(cc.store, "block"), (lin * 2 + 0.5 - 1.0).reshape(-1, 6).numpy(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(_read(cd.store, "block"), x.reshape(-1, 6).numpy())
    np.testing.assert_array_equal(_read(ce.store, "block"), np.full((20, 6), 0.5, np.float32))
    np.testing.assert_array_equal(_read(ch.store, "block"), (x[:, -1] * 2.0).numpy())
    assert cd.store.metadata["capture"]["output"] == 0


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_autograd_modes(tmp_path, mode):
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    ctx = {
        "grad": torch.enable_grad,
        "no_grad": torch.no_grad,
        "inference_mode": torch.inference_mode,
    }[mode]
    with ctx(), capture(net, layers=["0", "2"], out=tmp_path / "s", dtype="float32") as cap:
        y = net(x)
        if mode == "grad":
            y.sum().backward()  # capturing does not break autograd
            assert net[0].weight.grad is not None
    np.testing.assert_allclose(_read(cap.store, "2"), y.detach().numpy(), rtol=1e-6)
    _no_hooks(net)


def test_compile_fullgraph_is_refused_clearly(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(6, 4)
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    with pytest.raises(CaptureError, match="fullgraph=True"):
        capture(compiled, layers=["0"], out=tmp_path / "a").__enter__()
    _no_hooks(net)
    assert not (tmp_path / "a").exists()
    # compiled with fullgraph=True inside the block: torch's refusal becomes a clear error
    try:
        with (
            pytest.raises(CaptureError, match="fullgraph=True") as ei,
            capture(net, layers=["0"], out=tmp_path / "b"),
        ):
            torch.compile(net, backend="eager", fullgraph=True)(x)
        assert ei.value.__cause__ is not None
    finally:
        torch._dynamo.reset()
    _no_hooks(net)


def test_shard_bytes_and_user_metadata(minilm, texts, tmp_path):
    model, tok = minilm
    batches = _batches(tok, texts, bs=2)
    kw = dict(layers=["encoder.layer.0", "encoder.layer.5"], pool="tokens", dtype="bfloat16")
    with torch.inference_mode():
        with capture(model, out=tmp_path / "one", **kw) as c1:
            for enc in batches:
                model(**enc)
        with capture(
            model,
            out=tmp_path / "many",
            shard_bytes=20_000,
            metadata={"run": "demo", "seed": 3},
            **kw,
        ) as c2:
            for enc in batches:
                model(**enc)
    one, many = c1.store, c2.store
    assert len(one.shards) == 1 and len(many.shards) > 2
    np.testing.assert_array_equal(one.row_ids(), many.row_ids())
    for name in kw["layers"]:
        np.testing.assert_array_equal(_read(one, name), _read(many, name))
        assert many.dtypes[name] == "bfloat16"
    reopened = layerscope.open(tmp_path / "many", verify=True)
    assert reopened.metadata["user"] == {"run": "demo", "seed": 3}
    meta = reopened.metadata["capture"]
    assert meta["layers"]["encoder.layer.5"]["output_shape"][-1] == 384
    assert meta["model_class"] == "transformers.models.bert.modeling_bert.BertModel"
    assert meta["pool"] == "tokens" and meta["row_ids"] == "content"
    assert {"python", "torch", "numpy", "transformers"} <= set(meta["versions"])


def test_inplace_ops_after_the_layer_do_not_leak(tmp_path):
    """A 2-D float32 output is captured as is (no pooling, no cast): the copy must happen in
    the hook, before the in-place ReLU that follows overwrites the tensor."""
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(inplace=True), torch.nn.Linear(8, 2)
    )
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        pre = net[0](x)
        assert (pre < 0).any()
        with capture(net, layers=["0"], out=tmp_path / "s", dtype="float32") as cap:
            net(x)
    np.testing.assert_array_equal(_read(cap.store, "0"), pre.numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pinned_non_blocking_path(tmp_path):
    """On CUDA the rows are pooled on the device and copied into pinned host memory with
    non_blocking=True; the writer waits on the recorded event before reading them."""
    model = tiny_gpt2(seed=0, n_layer=3).cuda()
    ids = torch.randint(0, 1000, (4, 12), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    two = ["transformer.h.0", "transformer.h.1"]
    with torch.inference_mode():
        with capture(model, layers=two, out=tmp_path / "s", dtype="float16") as cap:
            for _ in range(5):
                model(input_ids=ids, attention_mask=mask)
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    m = mask.bool()
    want = ref.hidden_states[2][m].half().float().cpu().numpy()
    got = _read(cap.store, "transformer.h.1")
    assert got.shape[0] == 5 * int(m.sum())
    for k in range(5):
        np.testing.assert_allclose(
            got[k * len(want) : (k + 1) * len(want)], want, rtol=2e-3, atol=2e-3
        )


def test_package_attribute_capture_is_callable_after_submodule_import(tmp_path):
    """`import layerscope.capture` (done by this file and by the CLI) binds the package
    attribute to the submodule; `layerscope.capture(model, ...)` must still work."""
    import importlib

    importlib.import_module("layerscope.capture")
    net = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with layerscope.capture(net, layers="0", out=tmp_path / "s", dtype="float32") as cap:
        net(torch.ones(2, 3))
    assert cap.store.num_rows == 2
    assert isinstance(cap, Capture)
