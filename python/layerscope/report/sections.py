"""The report's sections: each turns the results of :mod:`.run` into summary lines
(:mod:`.summaries`), figures (the one heatmap and the figure helpers of
:mod:`layerscope.plots`) and HTML (:mod:`.html`), collected in a :class:`Document`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .._source import meta_get
from ..plots import NULL_ALPHA, figure, heat, png_bytes, tick_labels, xticks
from ..results import Result, _jsonable
from . import html
from .run import Side
from .summaries import (
    ADJ_THRESHOLD,
    adjacent_summary,
    agreement_summary,
    best_match,
    cross_summary,
    duplicate_summary,
    finite_mean,
    fmt,
    id_disagreement,
    id_summary,
    overlap_summary,
    pair_summary,
    relative_depth,
    spectrum_summary,
)


def _meta_text(res: Any) -> str:
    meta = getattr(res, "meta", {}) or {}
    parts = []
    n = meta.get("n", meta.get("rows_used", meta.get("n_rows")))
    if n is not None:
        parts.append(f"n={n}")
    s = meta.get("sample")
    if s is not None:
        parts.append(f"sample={s}")
    if meta.get("seed") is not None and (s is not None or "sample" in meta):
        parts.append(f"seed={meta.get('seed')}")
    return ", ".join(parts)


def _flat_meta(meta: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for key, val in meta.items():
        if isinstance(val, dict) and key in ("user", "capture"):
            for k2, v2 in val.items():
                if k2 in ("layers",):
                    continue
                rows.append((f"{key}.{k2}", v2))
        else:
            rows.append((key, val))
    out = []
    for key, val in rows:
        text = val if isinstance(val, str) else json.dumps(_jsonable(val), default=str)
        out.append((key, text if len(text) <= 160 else text[:157] + "…"))
    return out


def _store_summary(side: Side) -> tuple[list[tuple[str, str]], str, dict[str, Any]]:
    """(the key rows of the summary table, the full metadata as a collapsible table, info)."""
    src = side.src
    info: dict[str, Any] = {"layers": list(src.all_layers), "dims": dict(src.dims),
                            "rows": int(src.num_rows)}
    meta: dict[str, Any] = {}
    if src.is_store:
        st = src.store
        info["path"] = str(getattr(st, "path", "") or "")
        info["dtypes"] = {k: str(v) for k, v in dict(getattr(st, "dtypes", {}) or {}).items()}
        meta = dict(getattr(st, "metadata", {}) or {})
        info["metadata"] = meta
    else:
        info["dtypes"] = {k: str(a.dtype) for k, a in (src.arrays or {}).items()}
    model = meta_get(meta, "model", "model_name", "model_class") or "—"
    pool = meta_get(meta, "pool", "pooling") or "—"
    rows = [
        ("store", info.get("path") or "(in-memory arrays)"),
        ("model", str(model)),
        ("layers", f"{len(src.all_layers)}: " + ", ".join(src.all_layers)),
        ("widths", ", ".join(sorted({str(d) for d in src.dims.values()}, key=int))),
        ("rows", f"{src.num_rows:,}"),
        ("dtype", ", ".join(sorted(set(info["dtypes"].values())))),
        ("pooling", str(pool)),
    ]
    for key, label in (("corpus", "inputs"), ("inputs", "inputs"), ("dataset", "inputs")):
        v = meta_get(meta, key)
        if v is not None:
            rows.append((label, str(v)))
            break
    flat = _flat_meta(meta)
    details = ""
    if flat:
        details = (f"<details><summary>all metadata of {html.esc(side.title)} "
                   f"({len(flat)} entries)</summary>"
                   + html.table(["key", "value"], flat, left_cols=2) + "</details>")
    return rows, details, info


class Document:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.sections: list[tuple[str, str, str]] = []
        self.summary: dict[str, list[str]] = {}
        self.captions: dict[str, str] = {}
        self.info: dict[str, Any] = {}

    def addfigure(self, name: str, fig: Any, caption: str) -> str:
        png = png_bytes(fig)
        (self.out / f"{name}.png").write_bytes(png)
        self.captions[f"{name}.png"] = caption
        return html.figure(png, caption, alt=name)

    def add(self, anchor: str, heading: str, lines: list[str], body: str) -> None:
        self.summary[anchor] = lines
        self.sections.append((anchor, heading, html.summary_list(lines) + body))


def section_summary(doc: Document, sides: list[Side]) -> None:
    lines = []
    tables = []
    details = ""
    for s in sides:
        rows, more, info = _store_summary(s)
        doc.info[s.tag] = info
        tables.append(rows)
        details += more
        lines.append(f"{s.title}: {len(s.src.all_layers)} layers, {s.src.num_rows:,} rows, "
                     f"widths {', '.join(sorted({str(d) for d in s.src.dims.values()}, key=int))}"
                     f", stored as {', '.join(sorted(set(info['dtypes'].values())))}.")
    if len(sides) > 1:
        lines.append("The two inputs have the same row ids in the same order (checked), so every "
                     "cross-model number compares the two models on the same tokens.")
    keys = list(dict.fromkeys(k for t in tables for k, _ in t))
    grid = [[k, *[dict(t).get(k, "—") for t in tables]] for k in keys]
    body = html.table(["", *[s.title for s in sides]], grid, left_cols=1 + len(sides)) + details
    doc.add("store", "Store", lines, body)


def _null_text(cal: Any, hatch: Any) -> str:
    """The caption's sentence on the permutation null of the biased linear CKA."""
    if not isinstance(cal, Result) or hatch is None:
        return ""
    info = cal.meta["calibration"]
    nm = np.asarray(cal.meta["null_mean"], dtype=float)
    off = nm[~np.eye(*nm.shape, dtype=bool) & np.isfinite(nm)]
    span = (f"{off.mean():.3f} (from {off.min():.3f} to {off.max():.3f} over the pairs)"
            if off.size else "undefined")
    count = int(hatch[~np.eye(*hatch.shape, dtype=bool)].sum()) // 2
    return (f" Permutation null of the biased linear CKA on {info['n']} sampled rows "
            f"({info['null']} permutations, seed {info['seed']}): unrelated layers would give "
            f"a mean CKA of {span}; hatched: the {count} pair(s) whose CKA on that sample is "
            f"not distinguishable from it (p ≥ {NULL_ALPHA}).")


def section_cka(doc: Document, sides: list[Side], sample: int | None, seed: int) -> None:
    lines: list[str] = []
    body = ""
    kinds = [("cka_linear_biased", "linear CKA, biased"),
             ("cka_linear_debiased", "linear CKA, debiased"),
             ("cka_rbf", "RBF CKA (sampled)")]
    curves: list[tuple[str, str, np.ndarray, list[str]]] = []
    for s in sides:
        present = [(k, t) for k, t in kinds if isinstance(s.res.get(k), Result)]
        if not present:
            continue
        fig = figure(5.2 * len(present), 4.6)
        axes = fig.subplots(1, len(present), squeeze=False)[0]
        parts = []
        cal = s.res.get("cka_null")
        hatch = None
        for ax, (k, t) in zip(axes, present):
            r = s.res[k]
            if k == "cka_linear_biased" and isinstance(cal, Result) and cal.rows == r.rows:
                p = np.asarray(cal.meta["p_values"], dtype=float)
                hatch = np.isfinite(p) & (p >= NULL_ALPHA)
                heat(ax, r.values, r.rows, r.cols, f"{t}", cbar_label="CKA", hatch=hatch)
            else:
                heat(ax, r.values, r.rows, r.cols, f"{t}", cbar_label="CKA")
            parts.append(f"{t}: {_meta_text(r)}")
        fig.suptitle(f"Layer × layer CKA — {s.title}", fontsize=12)
        fig.tight_layout()
        cap = (f"Layer × layer CKA of {s.title}. Linear CKA = ‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on "
               "centred activations, exact over all rows from one streaming moment pass "
               "(Kornblith et al. 2019); debiased = the same ratio of unbiased HSIC estimates "
               "(Song et al. 2012; can be negative, never clamped); RBF CKA = biased HSIC of "
               "Gaussian kernels with bandwidth σ·√(median squared pairwise distance), σ = 1, "
               "on a seeded sample of rows. " + "; ".join(parts) + "." + _null_text(cal, hatch))
        body += doc.addfigure(f"cka_{s.tag}", fig, cap)
        names = list(s.src.all_layers)
        for k, t in kinds:
            r = s.res.get(k)
            if isinstance(r, Result) and len(r.rows) > 1:
                adj = np.array([r.values[i, i + 1] for i in range(len(r.rows) - 1)])
                curves.append((s.title, t, adj, list(r.rows)))
                if k == "cka_linear_biased":
                    lines += adjacent_summary(adj, names, f"{s.title} ({t})")
                    lines += pair_summary(r.values, names, f"{s.title} ({t})")
        base = s.res.get("cka_linear_biased")
        if isinstance(base, Result):
            for k, t in kinds[1:]:
                r = s.res.get(k)
                if isinstance(r, Result):
                    lines += agreement_summary(
                        base.values, r.values, names, s.title,
                        {"cka_linear_debiased": "debiased"}.get(k, t), "biased linear CKA")
    if curves:
        fig = figure(8.5, 4.4)
        ax = fig.subplots()
        styles = {"linear CKA, biased": "o-", "linear CKA, debiased": "s--",
                  "RBF CKA (sampled)": "^:"}
        colors = ["#3b5bdb", "#e8590c"]
        titles = list(dict.fromkeys(c[0] for c in curves))
        for who, t, adj, _rows in curves:
            ci = titles.index(who)
            ax.plot(range(len(adj)), adj, styles.get(t, "o-"), color=colors[ci % 2],
                    label=f"{who}: {t}", alpha=0.9 if ci == 0 else 0.7)
        rows0 = curves[0][3]
        names = tick_labels(rows0)
        xticks(ax, [f"{names[i]}→{names[i + 1]}" for i in range(len(rows0) - 1)])
        ax.axhline(ADJ_THRESHOLD, color="grey", lw=0.8, ls="--")
        ax.text(1.005, ADJ_THRESHOLD, f"{ADJ_THRESHOLD}", transform=ax.get_yaxis_transform(),
                va="center", ha="left", fontsize=8, color="grey")
        ax.set_ylabel("CKA(layer i, layer i+1)")
        ax.set_xlabel("adjacent layer pair")
        ax.set_title("Adjacent-layer similarity (layer-pruning view)", fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        body += doc.addfigure(
            "adjacent", fig,
            "Layer-pruning view: CKA between each layer and the next (the first diagonal above "
            "the heatmaps' main diagonal) — linear CKA biased (circles, solid) and debiased "
            "(squares, dashed), exact over all rows; RBF CKA on the seeded sample (triangles, "
            "dotted). Pairs above the dashed 0.95 line are near-duplicates of their neighbour: "
            "candidates to prune, skip or merge; dips mark where the representation changes.")
    if not body:
        body = html.note("No CKA result is available (see Notes).")
    doc.add("cka", "CKA across layers", lines, body)


def section_cross(doc: Document, cross: Side, sides: list[Side], sample: int | None,
                   seed: int) -> None:
    la, lb = sides[0].title, sides[1].title
    lines: list[str] = []
    body = ""
    main = cross.res.get("cka_linear_biased")
    panels = [(k, t) for k, t in (("cka_linear_biased", "linear CKA, biased"),
                                   ("cka_linear_debiased", "linear CKA, debiased"),
                                   ("cka_rbf", "RBF CKA (sampled)"))
              if isinstance(cross.res.get(k), Result)]
    if panels:
        fig = figure(5.4 * len(panels), 4.8)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        parts = []
        from matplotlib.patches import Rectangle

        for pi, (ax, (k, t)) in enumerate(zip(axes, panels)):
            r = cross.res[k]
            heat(ax, r.values, r.rows, r.cols, t, cbar_label="CKA",
                  ylabel=f"rows: {la}" if pi == 0 else "", xlabel=f"columns: {lb}")
            idx, _ = best_match(r.values)
            for i, j in enumerate(idx):
                if j >= 0:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False,
                                           edgecolor="#00e5ff", lw=2.0))
            parts.append(f"{t}: {_meta_text(r)}")
        fig.suptitle(f"Cross-model CKA — rows {la}, columns {lb}", fontsize=12)
        fig.tight_layout()
        body += doc.addfigure(
            "cross_cka", fig,
            f"CKA between every layer of {la} (rows) and every layer of {lb} (columns), on the "
            "same inputs (row ids checked equal): linear CKA biased (Kornblith et al. 2019) and "
            "debiased (unbiased HSIC, Song et al. 2012) exact over all rows from the same moment "
            "pass as the within-model tables; RBF CKA (median-rule bandwidth, σ = 1) on the same "
            "seeded sample of rows of both models. The outlined cell in each row is that "
            "layer's best match (argmax of the row). " + "; ".join(parts) + ".")
    if isinstance(main, Result):
        lines += cross_summary(main.values, main.rows, main.cols, la, lb)
        ref, _ = best_match(main.values)
        for k, t in (("cka_linear_debiased", "linear CKA, debiased"), ("cka_rbf", "RBF CKA")):
            r = cross.res.get(k)
            if isinstance(r, Result) and np.shape(r.values) == np.shape(main.values):
                idx, _ = best_match(r.values)
                same = int(np.sum((idx == ref) & (ref >= 0)))
                lines.append(f"{t} picks the same best match for {same} of {len(ref)} layers "
                             f"of {la}.")
        fig = figure(5.6, 4.3)
        ax = fig.subplots()
        ra, rb = relative_depth(len(main.rows)), relative_depth(len(main.cols))
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="same relative depth")
        for k, t, mk, dx in (("cka_linear_biased", "linear CKA, biased", "o", -0.012),
                             ("cka_linear_debiased", "linear CKA, debiased", "s", 0.0),
                             ("cka_rbf", "RBF CKA", "^", 0.012)):
            r = cross.res.get(k)
            if not isinstance(r, Result):
                continue
            idx, best = best_match(r.values)
            ok = idx >= 0
            sc = ax.scatter(ra[ok] + dx, rb[idx[ok]], c=best[ok], cmap="viridis", vmin=0, vmax=1,
                            marker=mk, s=60, edgecolors="black", linewidths=0.5, label=t)
        ax.set_xlabel(f"relative depth in {la}")
        ax.set_ylabel(f"relative depth of best match in {lb}")
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title("Best match per layer along relative depth", fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        cb = fig.colorbar(sc, ax=ax)
        cb.set_label("CKA of the best match", fontsize=9)
        fig.tight_layout()
        body += doc.addfigure(
            "cross_best_match", fig,
            f"Layer-matching view: for each layer of {la} (x, relative depth 0 = first, 1 = last "
            f"layer) the relative depth of its best-matching layer in {lb} (y), i.e. the argmax "
            "of each row of the cross-model tables: linear CKA biased (circles), debiased "
            "(squares), RBF on the seeded sample (triangles), offset slightly in x to stay "
            "visible; colour = the CKA of that match. Points on the diagonal mean the two "
            "models line up layer by layer.")
    if not body:
        body = html.note("No cross-model result is available (see Notes).")
    doc.add("cross", f"Layer matching: {la} vs {lb}", lines, body)


def section_spectra(doc: Document, sides: list[Side], cross: Side | None) -> None:
    lines: list[str] = []
    body = ""
    from matplotlib import colormaps

    for s in sides:
        sp = s.res.get("spectrum")
        if sp is None:
            continue
        layers = [name for name in s.src.all_layers if name in getattr(sp, "eigenvalues", {})]
        if not layers:
            continue
        names = tick_labels(layers)
        evr = {name: np.asarray(sp.explained_variance_ratio[name], dtype=float) for name in layers}
        table = {name: dict(sp.table.get(name, {})) for name in layers} if hasattr(
            sp, "table") else {}
        fig = figure(11.5, 4.4)
        ax1, ax2 = fig.subplots(1, 2)
        cmap = colormaps["viridis"]
        for i, name in enumerate(layers):
            e = evr[name]
            e = e[np.isfinite(e) & (e > 0)]
            color = cmap(i / max(1, len(layers) - 1))
            r = np.arange(1, e.size + 1)
            ax1.loglog(r, e, color=color, lw=1.4, label=names[i])
            ax2.semilogx(r, np.cumsum(e), color=color, lw=1.4, label=names[i])
        tops = [float(np.nanmax(v)) for v in evr.values() if np.isfinite(v).any()]
        if tops:  # the display floor only: near-zero eigenvalues (rank deficiency) stay in JSON
            lo, _ = ax1.get_ylim()
            ax1.set_ylim(max(lo, 1e-7 * max(tops)), None)
        ax1.set_xlabel("principal component (rank)")
        ax1.set_ylabel("explained variance ratio")
        ax1.set_title("Spectrum per layer (log-log)", fontsize=11)
        ax1.grid(alpha=0.3, which="both")
        ax2.axhline(0.9, color="grey", lw=0.8, ls="--")
        ax2.set_xlabel("number of components")
        ax2.set_ylabel("cumulative explained variance")
        ax2.set_title("Variance vs rank", fontsize=11)
        ax2.grid(alpha=0.3, which="both")
        ax2.legend(fontsize=7, loc="lower right", ncol=2 if len(layers) > 8 else 1,
                   title="layer", title_fontsize=8)
        fig.suptitle(f"Spectra — {s.title}", fontsize=12)
        fig.tight_layout()
        body += doc.addfigure(
            f"spectra_{s.tag}", fig,
            f"Eigenvalues of each layer's covariance ({s.title}), from the same moment pass as "
            f"linear CKA over {_meta_text(sp) or 'all rows'}, normalised to explained-variance "
            "ratios; colour runs from the first (purple) to the last layer (yellow). The log "
            "axis stops at 1e-7 of the largest ratio; every eigenvalue is in results.json.")
        lines += spectrum_summary(table, evr, layers, layers, s.title)
        metrics = [m for m in ("effective_rank", "participation_ratio", "stable_rank",
                               "pca_id_90", "pca_id_95", "pca_id_99")
                   if any(m in table.get(n, {}) for n in layers)]
        if metrics:
            rows = [[name, *[fmt(table[name].get(m, np.nan), 1 if "rank" in m or "ratio" in m
                                   else 0) for m in metrics]] for name in layers]
            body += html.table(["layer", *[m.replace("_", " ") for m in metrics]], rows)
    panels = [s for s in [*sides, *([cross] if cross is not None else [])]
              if isinstance(s.res.get("subspace_overlap"), Result)]
    if panels:
        fig = figure(5.6 * len(panels), 4.9)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        parts = []
        for ax, s in zip(axes, panels):
            ov = s.res["subspace_overlap"]
            k = s.res.get("subspace_k")
            heat(ax, ov.values, ov.rows, ov.cols, f"top-{k} overlap — {s.title}",
                  vmin=0.0, vmax=1.0, cbar_label="mean cos² of principal angles",
                  cmap="viridis",
                  xlabel=f"rows: {sides[0].title} · columns: {sides[1].title}"
                  if s is cross else "")
            parts.append(f"{s.title}: k={k}, {_meta_text(ov)}")
            if s is not cross:
                lines += overlap_summary(ov.values, ov.rows, s.title, int(k or 0))
            else:
                idx, best = best_match(ov.values)
                if (idx >= 0).any():
                    lines.append(f"{s.title}: mean best-match subspace overlap "
                                 f"{fmt(finite_mean(best))}.")
        fig.suptitle("Shared principal subspaces between layers", fontsize=12)
        fig.tight_layout()
        body += doc.addfigure(
            "subspace_overlap", fig,
            "Overlap of the top-k principal subspaces (token/sample space) of every layer pair: "
            "mean cos² of the principal angles (1 = the same subspace; about k/n for unrelated "
            "random subspaces of the n-dimensional sample space), from the accumulated "
            "cross-covariances — no second pass. "
            + "; ".join(parts) + ".")
    if not body:
        body = html.note("No spectrum or alignment result is available (see Notes).")
    doc.add("spectra", "Spectra and shared subspaces", lines, body)


def section_id(doc: Document, sides: list[Side], sample: int | None, seed: int,
                bootstrap: int) -> None:
    lines: list[str] = []
    body = ""
    series = []
    for s in sides:
        for key, meth in (("id_twonn", "TwoNN"), ("id_mle", "MLE (k=20)")):
            r = s.res.get(key)
            if r is None or not hasattr(r, "values"):
                continue
            layers = [name for name in s.src.all_layers if name in r.values]
            vals = np.array([float(r.values[name]) for name in layers])
            ci = getattr(r, "ci", None) or {}
            lo = np.array([float(ci[name][0]) if name in ci else np.nan for name in layers])
            hi = np.array([float(ci[name][1]) if name in ci else np.nan for name in layers])
            series.append((s.title, meth, layers, vals, lo, hi, r))
            if key == "id_twonn":
                lines += id_summary(vals, layers, f"{s.title} (TwoNN)")
                if np.isfinite(lo).any():
                    w = np.nanmax(hi - lo)
                    lines.append(f"{s.title} (TwoNN): widest 95 % bootstrap interval "
                                 f"{fmt(w, 1)} over {bootstrap} resamples.")
                lines += duplicate_summary(getattr(r, "details", {}) or {}, layers, s.title)
        lines += id_disagreement(s.res.get("id_twonn"), s.res.get("id_mle"), s.title)
    if series:
        fig = figure(8.5, 4.6)
        ax = fig.subplots()
        colors = ["#3b5bdb", "#e8590c"]
        titles = list(dict.fromkeys(x[0] for x in series))
        parts = []
        for who, meth, layers, vals, lo, hi, r in series:
            c = colors[titles.index(who) % 2]
            x = np.arange(len(layers))
            style = "o-" if meth == "TwoNN" else "s--"
            ax.plot(x, vals, style, color=c, label=f"{who}: {meth}")
            if np.isfinite(lo).any():
                ax.fill_between(x, lo, hi, color=c, alpha=0.18, lw=0)
            parts.append(f"{who} {meth}: {_meta_text(r)}")
        layers0 = series[0][2]
        xticks(ax, tick_labels(layers0))
        ax.set_xlabel("layer")
        allv = np.concatenate([x[3] for x in series])
        allv = allv[np.isfinite(allv) & (allv > 0)]
        logy = allv.size > 0 and float(allv.max()) > 15 * float(allv.min())
        if logy:  # IDs spanning more than a decade: a log axis keeps the small ones readable
            ax.set_yscale("log")
        ax.set_ylabel("intrinsic dimension" + (" (log axis)" if logy else ""))
        ax.set_title("Intrinsic dimension by depth", fontsize=11)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        body += doc.addfigure(
            "intrinsic_dimension", fig,
            "Intrinsic dimension of each layer's activations on a seeded sample: TwoNN (Facco "
            "et al. 2017) and Levina–Bickel MLE with k=20 neighbours (MacKay–Ghahramani "
            "harmonic pooling); shaded bands (and the table's brackets) = 2.5–97.5 % percentile "
            f"bootstrap intervals over {bootstrap} resamples of the per-point statistics; exact "
            "nearest neighbours, "
            "duplicate rows dropped" + ("; log y axis" if logy else "") + ". "
            + "; ".join(parts) + ".")
        all_layers = list(dict.fromkeys(name for x in series for name in x[2]))
        cells: list[list[str]] = [[name] for name in all_layers]
        for _who, _meth, layers, vals, lo, hi, _ in series:
            got = {name: (v, a_, b_) for name, v, a_, b_ in zip(layers, vals, lo, hi)}
            for row, name in zip(cells, all_layers):
                v, a_, b_ = got.get(name, (np.nan, np.nan, np.nan))
                ci = f" [{fmt(a_, 2)}, {fmt(b_, 2)}]" if np.isfinite(a_) else ""
                row.append(fmt(v, 2) + ci if name in got else "—")
        body += html.table(["layer", *[f"{x[0]}: {x[1]}" for x in series]], cells)
    if not body:
        body = html.note("No intrinsic-dimension result is available (see Notes).")
    doc.add("id", "Intrinsic dimension by depth", lines, body)
