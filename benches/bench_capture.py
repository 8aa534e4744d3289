"""Capture benchmark: the torch hook exporter (``layerscope.capture``) on all-MiniLM-L6-v2 (real
weights, CPU) over the standard-library text corpus, against the plain forward pass and the
"anchor" way of the peers (nnsight ``cache``, TransformerLens ``run_with_cache``, baukit
``TraceDict``): hooks append every layer's token rows to Python lists, then ``torch.cat`` and
one ``safetensors`` file at the end.

    python benches/bench_capture.py --quick            # 32 texts, max 48 tokens (< 60 s)
    python benches/bench_capture.py                    # the issue's setting: 512 texts
    python benches/bench_capture.py --quick --json out.json

Each contender (capture, anchor) runs in its own fresh (spawned) process that loads the model
and tokenises the same batches, so that one contender's allocations never flatter or inflate
the other's:

- timing: forward-only and forward + contender passes over the same batches, interleaved
  (``--repeats`` rounds, medians), so load from other processes hits both alike.
  Overhead = (forward + contender) / forward - 1. Rows/s and MB/s: store rows and bytes
  written per second of the whole pass.
- memory: the contender at 1x and then 8x data (the batches repeated 8 times as new
  samples). "peak" is the RSS high-water mark of the run (``VmHWM``, reset through
  ``/proc/self/clear_refs`` before it; without /proc, ``resource.getrusage(RUSAGE_SELF)
  .ru_maxrss``, monotonic over the process); "growth" is the peak above the RSS at the
  start of the run. Flat = the peak does not grow with the data.

All passes run under ``torch.inference_mode()`` with layers ``encoder.layer.*`` (6 x 384),
``pool="tokens"``, float16 storage, ``shard_bytes`` = ``--shard-mb`` MiB (the writer's
buffer; the capture's memory bound is about shard_bytes + queue_size batches).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from _common import gemm_rates, peak_mib, reset_peak, roofline_line, rss_mib

LAYERS = "encoder.layer.*"


def _setup(cfg: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from layerscope.corpus import stdlib_corpus
    from layerscope.models import load_minilm

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    model, tok = load_minilm()
    texts = stdlib_corpus(cfg["texts"], seed=0)
    bs = cfg["batch_size"]
    batches = [
        dict(
            tok(
                texts[i : i + bs],
                padding=True,
                truncation=True,
                max_length=cfg["max_length"],
                return_tensors="pt",
            )
        )
        for i in range(0, len(texts), bs)
    ]
    with torch.inference_mode():
        model(**batches[0])  # warm-up (allocator, oneDNN kernels)
    return model, batches


def _forward(model: Any, batches: list[dict[str, Any]], scale: int) -> None:
    import torch

    with torch.inference_mode():
        for _ in range(scale):
            for enc in batches:
                model(**enc)


def _capture(
    model: Any, batches: list[dict[str, Any]], scale: int, out: str, cfg: dict[str, Any]
) -> tuple[int, int]:
    import layerscope
    import torch

    with (
        torch.inference_mode(),
        layerscope.capture(
            model,
            layers=LAYERS,
            out=out,
            pool="tokens",
            dtype="float16",
            overwrite=True,
            shard_bytes=int(cfg["shard_mb"] * 2**20),
        ) as cap,
    ):
        for _ in range(scale):
            for enc in batches:
                model(**enc)
    return int(cap.store.num_rows), int(cap.store.nbytes)


def _anchor(model: Any, batches: list[dict[str, Any]], scale: int, out: str) -> tuple[int, int]:
    """The peers' way: keep every layer's (masked) token rows in RAM, concatenate, save."""
    import torch
    from safetensors.torch import save_file

    names = [f"encoder.layer.{i}" for i in range(6)]
    mods = dict(model.named_modules())
    cache: dict[str, list[Any]] = {n: [] for n in names}
    state: dict[str, Any] = {}

    def make(name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            h = output[0] if isinstance(output, tuple) else output
            cache[name].append(h[state["mask"]].to(torch.float16))

        return hook

    handles = [mods[n].register_forward_hook(make(n)) for n in names]
    try:
        with torch.inference_mode():
            for _ in range(scale):
                for enc in batches:
                    state["mask"] = enc["attention_mask"].bool()
                    model(**enc)
    finally:
        for h in handles:
            h.remove()
    tensors = {n: torch.cat(v) for n, v in cache.items()}
    cache.clear()
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "activations.safetensors")
    save_file(tensors, path)
    return int(next(iter(tensors.values())).shape[0]), os.path.getsize(path)


def _one(
    model: Any,
    batches: list[dict[str, Any]],
    method: str,
    scale: int,
    out: str,
    cfg: dict[str, Any],
) -> tuple[int, int]:
    if method == "capture":
        return _capture(model, batches, scale, out, cfg)
    return _anchor(model, batches, scale, out)


def _worker(cfg: dict[str, Any], method: str, scales: list[int], conn: Any) -> None:
    """One process per method (capture or anchor), so that neither inherits the other's
    allocations. First the timing rounds (forward only and forward + method, interleaved),
    then the memory runs at each scale, the RSS high-water mark reset
    (``/proc/self/clear_refs``) before each run so that each peak is that run's own."""
    import gc

    model, batches = _setup(cfg)
    out = tempfile.mkdtemp(prefix="lsbench-")
    try:
        dest = os.path.join(out, "s")
        fwd, meth = [], []
        rows = nbytes = 0
        for _ in range(cfg["repeats"]):
            t = time.perf_counter()
            _forward(model, batches, 1)
            fwd.append(time.perf_counter() - t)
            t = time.perf_counter()
            rows, nbytes = _one(model, batches, method, 1, dest, cfg)
            meth.append(time.perf_counter() - t)
        timing = {
            "method": method,
            "forward_s": fwd,
            "method_s": meth,
            "rows": rows,
            "bytes": nbytes,
            "batches": len(batches),
        }
        mem = []
        for scale in scales:
            shutil.rmtree(dest, ignore_errors=True)
            gc.collect()
            base = rss_mib()
            reset = reset_peak()
            t = time.perf_counter()
            rows, nbytes = _one(model, batches, method, scale, dest, cfg)
            wall = time.perf_counter() - t
            ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            peak = peak_mib() if reset else ru
            mem.append(
                {
                    "method": method,
                    "scale": scale,
                    "rows": rows,
                    "bytes": nbytes,
                    "wall_s": wall,
                    "base_rss_mib": base,
                    "peak_rss_mib": peak,
                    "ru_maxrss_mib": ru,
                    "growth_mib": peak - base,
                    "hwm_reset": reset,
                }
            )
        conn.send({"timing": timing, "memory": mem})
    finally:
        shutil.rmtree(out, ignore_errors=True)
        conn.close()


def _run(target: Any, *args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=target, args=(*args, child))
    p.start()
    child.close()
    try:
        res = parent.recv()
    except EOFError:
        p.join()
        raise RuntimeError(f"benchmark worker failed (exit code {p.exitcode})") from None
    p.join()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="32 texts, 48 tokens, batch 8, 3 rounds, 2 MiB shards"
    )
    ap.add_argument("--texts", type=int, default=None, help="texts (default 512; quick 32)")
    ap.add_argument("--max-length", type=int, default=None, help="default 128; quick 48")
    ap.add_argument("--batch-size", type=int, default=None, help="default 32; quick 8")
    ap.add_argument("--repeats", type=int, default=None, help="timing rounds (5; quick 3)")
    ap.add_argument("--scale", type=int, default=8, help="data multiple of the memory test")
    ap.add_argument("--shard-mb", type=float, default=None, help="default 16; quick 2")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: steady timings on a shared "
        "machine; 0 = torch's default)",
    )
    ap.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    a = ap.parse_args(argv)
    cfg = {
        "texts": a.texts or (32 if a.quick else 512),
        "max_length": a.max_length or (48 if a.quick else 128),
        "batch_size": a.batch_size or (8 if a.quick else 32),
        "repeats": a.repeats or (3 if a.quick else 5),
        "shard_mb": a.shard_mb or (2.0 if a.quick else 16.0),
        "threads": a.threads,
    }
    t0 = time.perf_counter()
    print(
        f"MiniLM-L6 (6 x 384, real weights) on CPU; {cfg['texts']} stdlib-docstring texts, "
        f"batch {cfg['batch_size']}, max_length {cfg['max_length']}; layers {LAYERS}, "
        f"pool=tokens, float16, shard_bytes={cfg['shard_mb']:g} MiB; "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    res = {m: _run(_worker, cfg, m, [1, a.scale]) for m in ("capture", "anchor")}
    tc, ta = res["capture"]["timing"], res["anchor"]["timing"]
    f = statistics.median(tc["forward_s"])
    c = statistics.median(tc["method_s"])
    fa = statistics.median(ta["forward_s"])
    an = statistics.median(ta["method_s"])
    print(
        f"\n{tc['rows']} token rows x 6 layers per pass ({tc['bytes'] / 2**20:.1f} MiB "
        f"float16), {tc['batches']} batches; {cfg['repeats']} interleaved rounds, medians"
    )
    print(f"{'pass':<30}{'wall s':>8}{'forward s':>11}{'overhead':>10}{'rows/s':>9}{'MB/s':>7}")
    for label, s_, f_, t in (
        ("forward + layerscope.capture", c, f, tc),
        ("forward + anchor (list+cat)", an, fa, ta),
    ):
        print(
            f"{label:<30}{s_:>8.3f}{f_:>11.3f}{(s_ / f_ - 1) * 100:>+9.1f}%"
            f"{t['rows'] / s_:>9.0f}{t['bytes'] / 1e6 / s_:>7.1f}"
        )
    print(
        f"capture overhead {100 * (c / f - 1):+.1f}% (goal <= 15%); rounds: forward "
        + ", ".join(f"{x:.2f}" for x in tc["forward_s"])
        + "; capture "
        + ", ".join(f"{x:.2f}" for x in tc["method_s"])
    )
    mem = res["capture"]["memory"] + res["anchor"]["memory"]
    print(
        f"\n{'memory':<12}{'data':>6}{'rows':>9}{'MiB out':>9}{'wall s':>8}"
        f"{'peak RSS MiB':>14}{'growth MiB':>12}"
    )
    for r in mem:
        print(
            f"{r['method']:<12}{'x' + str(r['scale']):>6}{r['rows']:>9}"
            f"{r['bytes'] / 2**20:>9.1f}{r['wall_s']:>8.2f}{r['peak_rss_mib']:>14.0f}"
            f"{r['growth_mib']:>12.1f}"
        )
    k = a.scale
    by = {(r["method"], r["scale"]): r for r in mem}
    for m in ("capture", "anchor"):
        r1, rk = by[(m, 1)], by[(m, k)]
        print(
            f"{m}: peak RSS x{k} - x1 = {rk['peak_rss_mib'] - r1['peak_rss_mib']:+.1f} MiB; "
            f"growth at x{k} = {rk['growth_mib'] / (rk['bytes'] / 2**20):.2f} x the data written"
        )
    print(roofline_line(*gemm_rates()) + " (no FMA kernel here: this benchmark is bound by "
          "memory and I/O bandwidth, in GB/s above)")
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(
                {
                    "config": cfg,
                    "timing": [tc, ta],
                    "overhead": c / f - 1,
                    "anchor_overhead": an / fa - 1,
                    "memory": mem,
                    "python": sys.version.split()[0],
                },
                fh,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
