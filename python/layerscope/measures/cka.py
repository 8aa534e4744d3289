"""Centred kernel alignment (CKA) between every pair of layers: ``layerscope.cka``.

Estimators (``X``, ``Y``: the ``n × d_x`` and ``n × d_y`` activations of two layers on the
same rows; ``H = I − 11ᵀ/n``; ``K``, ``L`` their Gram matrices):

* ``kernel="linear", estimator="biased"`` — Kornblith, Norouzi, Lee & Hinton (2019, ICML,
  "Similarity of neural network representations revisited"):
  ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with ``HSIC = tr(KHLH)/(n−1)²``
  (Gretton et al. 2005), which for ``K = XXᵀ`` is ``‖X̄ᵀȲ‖_F² / (‖X̄ᵀX̄‖_F ‖ȲᵀȲ‖_F)``
  (``X̄``: column-centred). Exact over **all rows**, in one streaming pass of the moment
  engine (f64, shifted data; ``layerscope._moments``), memory independent of ``n``.
* ``kernel="linear", estimator="debiased"`` — the same ratio with the unbiased HSIC of Song,
  Smola, Gretton, Bedo & Borgwardt (2012, JMLR 13, eq. 5):
  ``HSIC₁ = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3))``,
  ``K̃ = K − diag K``; from the same pass (both estimators are in ``res.extra``). Debiased
  CKA **can be negative** (independent layers give values scattered around 0); it is never
  clamped. NaN when a layer is constant or ``n < 4``.
* ``kernel="rbf"`` — ``K_ab = exp(−‖x_a − x_b‖²/(2 bw²))``, ``bw = sigma · sqrt(median of
  all pairwise squared distances, diagonal included)`` (Kornblith et al. 2019), on a seeded
  sample of rows (``sample``; by default all rows up to 4096, then a seeded sample of 4096);
  biased or debiased as above (Grams, HSIC and the ratio in Rust:
  ``layerscope_core::measures::cka::rbf`` and ``::hsic``).
* ``estimator="minibatch"`` (linear or RBF) — Nguyen, Raghu & Kornblith (2021, ICLR, "Do
  wide and deep networks learn the same things?"): the rows, in order, are cut into
  consecutive minibatches of ``batch_size`` rows (default 256; a final shorter batch is used
  when it has ≥ 4 rows), ``CKA = mean_b HSIC₁(K_b, L_b) / sqrt(mean_b HSIC₁(K_b, K_b) ·
  mean_b HSIC₁(L_b, L_b))``. For the RBF kernel the bandwidth rule above is applied **per
  minibatch** (the mean bandwidth is reported). Streamed in Rust
  (``layerscope_core::measures::cka``), memory one ``batch_size²`` Gram per layer. It
  estimates the population (unbiased) CKA, so it approaches the debiased value, not the
  biased one; its spread shrinks with the number of batches.

Non-finite values: ``nonfinite="error"`` raises ``NonFiniteError`` naming the layer and the
first bad row; ``nonfinite="nan"`` warns and sets every cell involving such a layer to NaN.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .. import _native
from .._defaults import BATCH_SIZE, SAMPLE_CAP
from .._moments import COMPUTE, pair_stats
from .._progress import Progress
from .._sample import check_sample, indices_hash, load, sample_indices
from .._source import Source, check_comparable, native_part, resolve
from .._validate import LAYERS, RUN, SEED, Float, Int, OneOf, RunOptions, validated
from ..errors import InvalidArgumentError
from ..results import MatrixResult

if TYPE_CHECKING:  # Python < 3.11 has no typing.Unpack; the annotations are strings
    from typing_extensions import Unpack

__all__ = ["cka", "DEFAULT_BATCH_SIZE"]

KERNELS = ("linear", "rbf")
ESTIMATORS = ("biased", "debiased", "minibatch")
#: Rows per minibatch of ``estimator="minibatch"`` when ``batch_size`` is None.
DEFAULT_BATCH_SIZE: int = BATCH_SIZE


@validated(kernel=OneOf(*KERNELS), estimator=OneOf(*ESTIMATORS), layers=LAYERS,
           other_layers=LAYERS, sample=(None, Int(1)), seed=SEED, sigma=Float(0, lo_open=True),
           batch_size=(None, Int(4)), nonfinite=OneOf("error", "nan"), compute=OneOf(*COMPUTE),
           strategy=(None, OneOf(*_native.PAIR_STRATEGIES)), null=Int(0), bootstrap=Int(0),
           confidence=Float(0, 1, lo_open=True, hi_open=True), options=RUN)
def cka(
    source: Any,
    other: Any = None,
    *,
    kernel: str = "linear",
    estimator: str = "biased",
    layers: Sequence[str] | str | None = None,
    other_layers: Sequence[str] | str | None = None,
    sample: int | None = None,
    seed: int = 0,
    sigma: float = 1.0,
    batch_size: int | None = None,
    nonfinite: str = "error",
    compute: str = "auto",
    strategy: str | None = None,
    null: int = 0,
    bootstrap: int = 0,
    confidence: float = 0.95,
    **run: Unpack[RunOptions],
) -> MatrixResult:
    """CKA of every layer pair (see the module docstring for the formulas and papers).

    Args:
        source: an ``ActivationStore``, a store path, or a dict ``{layer: 2-D array}``
            (numpy or torch; bf16 tensors are widened exactly).
        other: a second source over the same rows (row ids are checked, in order;
            ``MismatchError`` says where they diverge). None: all pairs within ``source``
            (a symmetric matrix, each pair computed once).
        kernel: ``"linear"`` or ``"rbf"``.
        estimator: ``"biased"`` (Kornblith et al. 2019), ``"debiased"`` (unbiased HSIC, Song
            et al. 2012; may be negative) or ``"minibatch"`` (Nguyen et al. 2021).
        layers / other_layers: layer names (None: all, in store order).
        sample: use a seeded sample of this many rows (``default_rng(seed).choice``, sorted).
            Linear biased/debiased default to all rows; RBF to all rows up to 4096.
        seed: the sampling seed (recorded in ``meta``).
        sigma: RBF bandwidth multiplier (``bw = sigma · sqrt(median squared distance)``).
        batch_size: rows per minibatch (``estimator="minibatch"``; default 256, ≥ 4).
        max_memory: the memory budget, bytes or a size string (``"4G"``, ``"512M"``,
            ``"1.5GiB"``); default ``LAYERSCOPE_MAX_MEMORY``, else 0.8 × the smallest of the
            available memory, the cgroup limit and the ``RLIMIT_AS`` headroom (see
            :func:`layerscope.memory_budget`). Checked before any row is read against the
            exact peak of the call — linear: the moment accumulator ``(D+L)²·8`` (``D`` =
            sum of widths), its block buffers and SYRK panels; RBF/minibatch: the Gram
            matrices and their workspace. Above it a ``MemoryBudgetError`` says what fits
            (how many of the layers, or the largest ``sample``/``batch_size``).
        nonfinite: ``"error"`` (``NonFiniteError`` naming layer and first bad row) or
            ``"nan"`` (a ``RuntimeWarning``; the affected cells are NaN).
        compute: arithmetic of the linear biased/debiased pass. ``"float64"``: every
            product in f64. ``"float32"``: the ``D × D`` block products from mean-shifted
            values in f32, summed over ≤ 128 rows, accumulated in f64 (about 2× faster;
            agrees with f64 to 1e-6 on the adversarial cases in the tests; the shift is the
            mean of rows spread over the whole source, and ``meta["shift_offset"]`` reports
            how far it was from the mean, in standard deviations). ``"auto"`` (default):
            float32 when every selected layer is stored in 32 bits or fewer (f32/f16/bf16
            stores, float32 arrays), else float64; RBF and minibatch always compute in
            float64. ``"tf32"`` (a CUDA ``device`` only): the float32 products in TF32
            tensor-core arithmetic — an approximation (about 1e-3 relative per product),
            stated in ``meta["approximation"]``.
        strategy: how the exact linear (biased/debiased) estimate is computed. None
            (default): the plan with the least estimated time among those that fit
            ``max_memory``. ``"single-pass"``: one moment accumulator over all layers
            (``(D+L)²·8`` bytes). ``"tiled"``: layers — and layers too wide on their own, in
            blocks of feature columns — grouped into tiles whose accumulators fit, one pass
            per tile, each pair of column blocks computed once (the same multiply-adds, more
            bytes read). ``"gram"``: per-layer centred ``n × n`` Gram matrices (``n²·d/2``
            multiply-adds per layer; CKA from their inner products), as many held as the
            budget allows — the cheap route when ``n`` is small against the widths. All give
            the same numbers (to rounding). ``meta["plan"]`` records the strategy, passes,
            peak bytes, bytes read and FLOPs.
        progress: True (tqdm bar), False, or a callable ``cb(done, total)``.
        backend: ``"local"`` (default) or ``"ray"``: the linear biased/debiased pass cut into
            row-range tasks of the same plan on a Ray cluster, merged in a tree of tasks —
            the same numbers (f64: 1e-10, f32: 1e-6); RBF as one task per layer (its Gram)
            and one per block of layer pairs (their HSICs) — equal to the last bit;
            minibatch as ranges of whole minibatches, their mean HSICs averaged by batch
            count (equal to rounding). Stores are read where they lie: every
            node must see the store at the same path (checked by its manifest SHA-256).
            ``meta["backend"]`` and ``meta["tasks"]`` record what ran.
        ray_address: the cluster to join when no Ray session is running (else
            ``RAY_ADDRESS``, else a local instance on 127.0.0.1); a running session
            (``ray.is_initialized()``) is used as it is.
        device: where the products run. None
            (default): the Rust CPU engine. A torch device (``"cuda"``, ``"cuda:1"``, or
            ``"cpu"``: the torch engine on the CPU) or ``"auto"`` (CUDA when torch sees one,
            else Rust): the block products of every plan (single pass, tiles, Gram route)
            on that device under the CPU engine's rules — the same sampled shift and scale,
            f32 products summed over at most 128 rows and accumulated in f64 (TF32 off), f64
            where the CPU uses f64 — the sums handed back to the core, which finalises them
            (:mod:`layerscope._device`; equal to the Rust engine to 1e-10 in f64 and 1e-6
            in f32, tested). RBF: each layer's distance products there, the bandwidth,
            kernel and HSICs in Rust (the same numbers); minibatch: each minibatch's Gram
            products there, the rest in Rust. ``meta["device"]`` records it. Several
            devices (``["cuda:0", "cuda:1"]``, ``"cuda:0,cuda:1"``, or ``"cuda"`` with
            several GPUs visible) share the tiles of a tiled pass; the plan is sized to the
            device's memory (``LAYERSCOPE_MAX_DEVICE_MEMORY``, else 0.8 × its free memory).
            With ``backend="ray"`` (linear only): ``"cuda"`` gives each range task a GPU
            (``num_gpus=1``), ``"cpu"`` the torch engine in the tasks (``docs/scale.md``).
        null: permutations of the rows of one layer against the other (0: none). Adds
            ``meta["p_values"]`` (``(1 + #{permuted CKA ≥ CKA}) / (null + 1)`` per pair) and
            ``meta["null_mean"]`` (the mean CKA under permutation: what unrelated layers give
            at this sample size and these widths). Biased and debiased, linear and RBF; on a
            seeded sample through centred Gram matrices (``sample`` rows when given; else all
            rows up to 4096, a seeded sample of 4096 beyond, fewer when the Grams would not
            fit ``max_memory``), stated in ``meta["calibration"]`` with the sample's own CKA
            table (``values``: what the p-values and intervals refer to — with a sample, the
            same as ``values``) (:mod:`layerscope.measures._calibrate`).
        bootstrap: row resamples (with replacement) of the same sample (0: none). Adds
            ``meta["ci"]`` (``2 × rows × cols``: the lower and upper percentile bounds).
        confidence: the level of the bootstrap interval (default 0.95).

    Returns:
        A :class:`~layerscope.results.MatrixResult`: ``values[i, j]`` is the CKA of
        ``rows[i]`` (of ``source``) and ``cols[j]`` (of ``other``, or ``source``); ``meta``
        has the kernel, estimator, ``n`` (rows used), ``n_total``, ``seed``, sample hash,
        bandwidths and timings; with ``null``/``bootstrap``, ``p_values``, ``null_mean``,
        ``ci`` and ``calibration``.
    """
    t0 = time.perf_counter()
    if (null or bootstrap) and estimator == "minibatch":
        raise InvalidArgumentError(
            "null= and bootstrap= calibrate the biased and debiased estimators (on centred "
            "Grams of one sample); estimator='minibatch' has no Gram of all rows to permute")
    if batch_size is not None and estimator != "minibatch":
        raise InvalidArgumentError("batch_size only applies to estimator='minibatch'")
    if strategy is not None and (kernel != "linear" or estimator == "minibatch"):
        raise InvalidArgumentError(
            "strategy applies to the linear biased/debiased estimators (the moment engine)")
    if compute == "auto" and (kernel != "linear" or estimator == "minibatch"):
        compute = "float64"
    if compute != "float64" and (kernel != "linear" or estimator == "minibatch"):
        raise InvalidArgumentError(
            "compute='float32' applies to the linear biased/debiased estimators (the moment "
            "engine); RBF and minibatch CKA compute in float64")

    from ._passes import is_capture

    if is_capture(source):
        if null or bootstrap:
            raise InvalidArgumentError(
                "null= and bootstrap= need the rows; a capture holds only their moments")
        return _captured(source, other, kernel, estimator, layers, run["max_memory"], t0)
    a = resolve(source)
    b = resolve(other) if other is not None else None
    la = a.select(layers)
    lb = b.select(other_layers) if b is not None else None
    if b is not None:
        check_comparable(a, b)
    elif other_layers is not None:
        raise InvalidArgumentError("other_layers needs other=")

    job = _Job(a, b, la, lb, sample, seed, nonfinite, run)
    if estimator == "minibatch":
        res = _minibatch(job, kernel, sigma, batch_size or DEFAULT_BATCH_SIZE)
    elif kernel == "linear":
        res = _linear(job, estimator, compute, strategy)
    else:
        res = _rbf(job, estimator, sigma)
    if null or bootstrap:
        t1 = time.perf_counter()
        res.meta.update(_calibrated(job, kernel, estimator, sigma, null, bootstrap, confidence))
        res.meta.setdefault("timings", {})["calibration"] = time.perf_counter() - t1
    res.meta["seconds"] = time.perf_counter() - t0
    return res



def _calibrated(job: _Job, kernel: str, estimator: str, sigma: float, null: int,
                bootstrap: int, confidence: float) -> dict[str, Any]:
    """``meta`` entries of ``null=``/``bootstrap=`` (:mod:`._calibrate`): in this process,
    the Grams' products on ``device`` when one is given (with ``backend="ray"``: on the CPU
    here, the sample being small)."""
    from .._device.products import products
    from .._moments import _device_for
    from ._calibrate import calibrate

    a, b, la, lb, sample, seed, nonfinite, run = job
    max_memory, progress = run["max_memory"], run["progress"]
    dev = _device_for(run["device"], "local", "float64") if run["backend"] == "local" else None
    return calibrate(a, b, la, lb, kernel=kernel, estimator=estimator, sigma=sigma, null=null,
                     bootstrap=bootstrap, confidence=confidence, sample=sample, seed=seed,
                     max_memory=max_memory, nonfinite=nonfinite, progress=progress,
                     products=products(dev))


def _captured(cap: Any, other: Any, kernel: str, estimator: str, layers: Any,
              max_memory: Any, t0: float) -> MatrixResult:
    """Linear CKA from a capture's accumulated statistics (no pass over any rows)."""
    from ._passes import run_measures
    from .alignment import cka_table

    if kernel != "linear" or estimator == "minibatch":
        raise InvalidArgumentError(
            "a capture's statistics give linear CKA (biased and debiased); RBF and minibatch "
            "CKA need the rows: capture with out=... and pass the store")
    deb = estimator == "debiased"
    t, raw, meta = run_measures(cap, layers, other, None, spectrum=False, aligns={},
                                ckas=[deb], compute="float32",
                                run={"max_memory": max_memory, "progress": False})
    res = cka_table(raw[("cka", deb)], t.names, t.names, debiased=deb, meta=meta)
    res.meta.update(measure="cka", kernel="linear", estimator=estimator, n_total=t.n,
                    seconds=time.perf_counter() - t0)
    return res


class _Job(NamedTuple):
    """What every estimator of one call works on: the sources, their selected layers (``lb``
    None: the pairs within ``a``) and the options they all share."""

    a: Source
    b: Source | None
    la: list[str]
    lb: list[str] | None
    sample: int | None
    seed: int
    nonfinite: str
    run: RunOptions


# ----------------------------------------------------------------------------------------
# helpers


def _sampled(src: Source, names: list[str], idx: np.ndarray) -> dict[str, np.ndarray]:
    """The sampled rows of each layer, in memory (f32 exact for f32/f16/bf16, else f64)."""
    return {x: src.take(x, idx, dtype=src.exact_dtype(x)) for x in names}


def _warn_nonfinite(bad: dict[str, int]) -> None:
    if bad:
        where = ", ".join(f"{k!r} (first at row {v})" for k, v in bad.items())
        warnings.warn(
            f"non-finite values (NaN/Inf) in layers {where}: every CKA cell involving them is NaN",
            RuntimeWarning,
            stacklevel=3,
        )


def _base_meta(
    kernel: str, estimator: str, n_total: int, seed: int, sample: int | None
) -> dict[str, Any]:
    return {
        "measure": "cka",
        "kernel": kernel,
        "estimator": estimator,
        "n_total": n_total,
        "seed": int(seed),
        "sample": sample,
    }


# ----------------------------------------------------------------------------------------
# linear, exact (moments)


def _linear(job: _Job, estimator: str, compute: str, strategy: str | None) -> MatrixResult:
    a, b, la, lb, sample, seed, nonfinite, run = job
    meta = _base_meta("linear", estimator, a.num_rows, seed, sample)
    src_a: Any = a
    src_b: Any = b
    if sample is not None:
        idx = sample_indices(a.num_rows, sample, seed)
        src_a = _sampled(a, la, idx)
        src_b = _sampled(b, lb, idx) if b is not None and lb is not None else None
        meta["sample_hash"] = indices_hash(idx)
    m, mmeta = pair_stats(
        src_a,
        la,
        src_b,
        lb if b is not None else None,
        check_finite=(nonfinite == "error"),
        compute=compute,
        strategy=strategy,
        **run,
    )
    t1 = time.perf_counter()
    nl = len(m.dims)
    rows = list(range(m.num_a))
    cols = rows if b is None else list(range(m.num_a, nl))
    biased = np.asarray(m.cka(rows, cols, False))
    debiased = np.asarray(m.cka(rows, cols, True))
    values = debiased if estimator == "debiased" else biased
    _warn_nonfinite(mmeta.get("nonfinite_rows", {}))
    plan = mmeta["plan"]
    how = {"single-pass": "one pass over all rows",
           "tiled": f"{plan['passes']} tiled passes over all rows",
           "gram": "per-layer n × n Gram matrices"}[plan["strategy"]]
    meta.update(
        n=int(m.n),
        engine=f"moments ({mmeta['engine']}), {how}",
        compute=mmeta["compute"],
        shift_offset=mmeta["shift_offset"],
        plan=plan,
        timings={"pass": mmeta["seconds_pass"], "cka": time.perf_counter() - t1},
        backend=run["backend"],
    )
    if "tasks" in mmeta:
        meta["tasks"] = mmeta["tasks"]
    for key in ("device", "approximation", "devices", "device_budget"):
        if key in mmeta:
            meta[key] = mmeta[key]
    if "nonfinite_rows" in mmeta:
        meta["nonfinite_rows"] = mmeta["nonfinite_rows"]
    reasons = _nan_reasons(m, values, rows, cols, estimator == "debiased",
                           [*la, *(f"other:{x}" for x in (lb or []) if b is not None)],
                           set(mmeta.get("nonfinite_rows", {})))
    if reasons:
        meta["nan_reasons"] = reasons
        warnings.warn("CKA is NaN for some pairs: " + "; ".join(
            f"{k}: {v}" for k, v in reasons.items()), RuntimeWarning, stacklevel=4)
    return MatrixResult(
        values,
        la,
        lb if lb is not None else la,
        meta=meta,
        extra={"biased": biased, "debiased": debiased},
    )


def _nan_reasons(m: Any, values: np.ndarray, rows: list[int], cols: list[int],
                 debiased: bool, names: list[str], nonfinite: set[str]) -> dict[str, str]:
    """Why each layer of a NaN cell has no CKA (its layers' own self-CKA says which): zero
    variance, or — debiased — a self-HSIC that is not positive (fewer than 4 rows, or a few
    rows dominating the layer, e.g. one outlier: the estimator excludes the diagonal, and
    what remains is the difference of sums equal to ~15 digits). Layers with NaN/Inf rows
    are reported by the non-finite warning instead."""
    out: dict[str, str] = {}
    bad = np.argwhere(np.isnan(values))
    layers = sorted({rows[i] for i, _ in bad} | {cols[j] for _, j in bad})
    for k in layers:
        name = names[k]
        if name in nonfinite:
            continue
        if np.isnan(m.cka([k], [k], False)[0][0]):
            out[name] = "zero variance (a constant layer): CKA is undefined"
        elif debiased and np.isnan(m.cka([k], [k], True)[0][0]):
            out[name] = (f"its debiased self-HSIC is not positive (n = {m.n} rows; fewer than 4, "
                         "or a few rows dominate the layer, e.g. an outlier): the debiased "
                         "estimate is undefined; the biased one is in extra['biased']")
    return out


# ----------------------------------------------------------------------------------------
# RBF on a sample


def _rbf(job: _Job, estimator: str, sigma: float) -> MatrixResult:
    """RBF CKA on the seeded sample: the sampled rows of every layer in memory (f64, checked
    finite), Grams, HSIC and the CKA ratio in Rust (``layerscope_core::measures::cka::rbf``,
    one Gram per layer reused for every pair). With ``nonfinite="nan"``, layers holding
    NaN/Inf among the sampled rows get NaN cells and the others are computed. On Ray: one
    task per layer builds its Gram, one task per block of pairs the HSICs
    (:mod:`layerscope._ray_sampled`: the same functions, the same numbers). With a
    ``device``: each layer's distance products there (``prepare_layer(products=)``), the
    bandwidth, kernel and HSICs in Rust — the steps of the Ray route."""
    a, b, la, lb, sample, seed, nonfinite, run = job
    max_memory, progress, backend = run["max_memory"], run["progress"], run["backend"]
    from .._device.devices import describe
    from .._device.products import products
    from .._moments import _device_for

    dev = _device_for(run["device"], backend, "float64")

    cols_all = lb if lb is not None else la
    idx = sample_indices(a.num_rows, sample, seed, SAMPLE_CAP)
    m = int(idx.size)
    meta = _base_meta("rbf", estimator, a.num_rows, seed, sample)
    meta["n"] = m

    def table(ga: list[str], gb: list[str]) -> np.ndarray:
        t0 = time.perf_counter()
        nb = len(gb) if b is not None else 0
        meta.update(
            sigma=float(sigma),
            bandwidth_rule="sigma * sqrt(median pairwise squared distance, diagonal included)",
            sample_hash=indices_hash(idx),
            gram_bytes=(len(ga) + nb) * m * m * 8,
        )
        meta["backend"] = backend
        if backend == "ray":
            from .._ray_sampled import pair_table

            r = pair_table("rbf", a, b, ga, gb if b is not None else None, idx,
                           {"sigma": sigma, "unbiased": estimator == "debiased"},
                           max_memory=max_memory, progress=progress, address=run["ray_address"])
            meta["tasks"] = r["tasks"]
        else:
            check_sample(a, b, ga, gb, m, max_memory)
            # each layer's rows in unit range when far from it (exact powers of two; the
            # bandwidths go back to the data's units below)
            la_e = [load(a, name, idx, with_exp=True) for name in ga]
            lb_e = [load(b, name, idx, with_exp=True) for name in gb] if b is not None else None
            xa = [x for x, _ in la_e]
            xb = [x for x, _ in lb_e] if lb_e is not None else None
            unbiased = estimator == "debiased"
            if dev is None:
                with Progress(progress, "rbf cka", unit="step") as prog:
                    r = _native.rbf_hsic(xa, xb, sigma=sigma, unbiased=unbiased,
                                         max_memory=max_memory, progress=prog.cb)
            else:
                prod = products(dev)

                def prep(xs: list[np.ndarray]) -> list[Any]:
                    return [_native.prepare_layer(x, "rbf", sigma=sigma, unbiased=unbiased,
                                                  max_memory=max_memory, products=prod)
                            for x in xs]

                pa = prep(xa)
                r = dict(_native.prepared_table(pa, prep(xb) if xb is not None else None))
                if xb is None:
                    r["bw_b"] = r["bw_a"]
                meta["device"] = describe(dev)
            r = dict(r)
            r["bw_a"] = np.ldexp(np.asarray(r["bw_a"], dtype=np.float64),
                                 np.array([e for _, e in la_e], dtype=np.int32))
            if lb_e is not None:
                r["bw_b"] = np.ldexp(np.asarray(r["bw_b"], dtype=np.float64),
                                     np.array([e for _, e in lb_e], dtype=np.int32))
        bw_b = r["bw_b"] if b is not None else r["bw_a"]
        meta["bandwidths_a"] = {k: float(v) for k, v in zip(ga, r["bw_a"])}
        meta["bandwidths_b"] = {k: float(v) for k, v in zip(gb, bw_b)}
        meta["timings"] = {"rbf": time.perf_counter() - t0}
        return np.asarray(r["values"])

    if nonfinite == "error":
        return MatrixResult(table(la, cols_all), la, cols_all, meta=meta)
    # nonfinite="nan": find the layers with NaN/Inf among the sampled rows (the rows the
    # kernel will use), compute the others, and fill NaN for them.
    bad: dict[str, int] = {}
    bad_b: dict[str, int] = {}
    for src, names, out in ((a, la, bad), (b, lb, bad_b)):
        if src is None or names is None:
            continue
        for x in names:
            v = src.take(x, idx, dtype=np.float64)
            rows = np.flatnonzero(~np.isfinite(v).all(axis=1))
            if rows.size:
                out[x] = int(idx[rows[0]])
    ga = [x for x in la if x not in bad]
    gb = [x for x in cols_all if x not in (bad_b if b is not None else bad)]
    values = np.full((len(la), len(cols_all)), np.nan)
    if ga and gb:
        ri = [la.index(x) for x in ga]
        ci = [cols_all.index(x) for x in gb]
        values[np.ix_(ri, ci)] = table(ga, gb)
    allbad = {**bad, **{f"other:{k}": v for k, v in bad_b.items()}}
    _warn_nonfinite(allbad)
    meta["nonfinite_rows"] = allbad
    return MatrixResult(values, la, cols_all, meta=meta)


# ----------------------------------------------------------------------------------------
# minibatch (Rust, streamed)


def _minibatch(job: _Job, kernel: str, sigma: float, batch_size: int) -> MatrixResult:
    a, b, la, lb, sample, seed, nonfinite, run = job
    max_memory, progress, backend = run["max_memory"], run["progress"], run["backend"]
    from .._device.devices import describe
    from .._device.products import products
    from .._moments import _device_for

    dev = _device_for(run["device"], backend, "float64")
    meta = _base_meta(kernel, "minibatch", a.num_rows, seed, sample)
    parts: list[tuple[Source, list[str]]] = [(a, la)]
    if b is not None and lb is not None:
        parts.append((b, lb))
    names = [x for _, ls in parts for x in ls]
    num_a = len(la)
    idx = sample_indices(a.num_rows, sample, seed) if sample is not None else None
    if idx is not None:
        meta["sample_hash"] = indices_hash(idx)
    t1 = time.perf_counter()
    if backend == "ray":
        from .._ray_sampled import minibatch

        r = minibatch(parts, names, num_a, kernel=kernel, sigma=sigma, batch_size=batch_size,
                      sample=idx, check_finite=nonfinite == "error", max_memory=max_memory,
                      progress=progress, address=run["ray_address"])
        meta.update(backend="ray", tasks=r["tasks"])
    else:
        with Progress(progress, "minibatch cka") as prog:
            r = _native.minibatch_cka_pass(
                [native_part(src, ls) for src, ls in parts], names, kernel=kernel,
                sigma=sigma, batch_size=batch_size, num_a=num_a,
                check_finite=nonfinite == "error", max_memory=max_memory, progress=prog.cb,
                sample=None if idx is None else idx.tolist(), products=products(dev))
        meta["backend"] = "local"
        if dev is not None:
            meta["device"] = describe(dev)
    engine = ("ray range tasks" if backend == "ray" else
              "rust-stream" if all(src.is_store for src, _ in parts) else "rust-arrays")
    nf = {x: int(v) for x, v in zip(names, r["nonfinite"]) if v is not None}
    if b is not None:
        nf = {
            (x if i < num_a else f"other:{x}"): int(v)
            for i, (x, v) in enumerate(zip(names, r["nonfinite"]))
            if v is not None
        }
    _warn_nonfinite(nf)
    meta.update(
        n=int(r["rows_used"]),
        rows_seen=int(r["rows_seen"]),
        batch_size=batch_size,
        n_batches=int(r["batches"]),
        engine=f"minibatch ({engine})",
        timings={"minibatch": time.perf_counter() - t1},
    )
    if nf:
        meta["nonfinite_rows"] = nf
    if kernel == "rbf":
        bw = [float(v) for v in r["bandwidths"]]
        meta["bandwidth"] = "per minibatch (mean over batches reported)"
        meta["bandwidth_rule"] = "sigma * sqrt(median pairwise squared distance, diagonal included)"
        meta["sigma"] = sigma
        meta["bandwidths_a"] = dict(zip(la, bw[:num_a]))
        meta["bandwidths_b"] = (
            dict(zip(lb, bw[num_a:])) if lb is not None else dict(zip(la, bw[:num_a]))
        )
    cols = lb if lb is not None else la
    # the mean HSICs in the data's units (a layer far from unit scale was accumulated in
    # units of 2^-e; ±Inf where the true value is beyond float64)
    e = np.asarray(r.get("scale_exp", [0] * len(names)), dtype=np.int32)
    with np.errstate(over="ignore"):  # ±Inf is the answer beyond float64
        hsic = np.ldexp(np.asarray(r["hsic"], dtype=np.float64), 2 * (e[:, None] + e[None, :]))
    return MatrixResult(np.asarray(r["values"]), la, cols, meta=meta, extra={"hsic": hsic})
