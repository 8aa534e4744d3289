"""Many runs at once: :func:`batch` computes the same measures over a list of stores
(checkpoints over training, seeds, a model before and after an edit) into one folder::

    DIR/results.csv          the tidy table (layerscope.batch.table: one row per store pair,
                             layer pair, measure and estimator, with value, n and seed)
    DIR/items/<measure>/*.json  each item's full result (MatrixResult, IDResult, ...) with the
                             fingerprints of the stores it read and the options it ran with
    DIR/batch.json           the run: stores (label, path, fingerprint), pairs, measures,
                             options, what was computed, skipped and failed
    DIR/index.html           what to look at: the run and its figures (layerscope.runs.figures),
                             self-contained; the figures also as DIR/figures/*.png

Resumable: each finished item is written atomically (temp file + rename); a rerun skips every
item whose file is there with the same store fingerprints (SHA-256 of each manifest, which
lists every shard's checksum) and options, and recomputes the others. ``results.csv`` is
rebuilt from the item files (atomically, in plan order), so ``kill -9`` loses only the items
in flight and the table never holds a torn or duplicated row. One process at a time: a second
``batch`` on the same folder raises :class:`~layerscope.errors.LockedError` naming the holder.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._memory import max_memory_bytes, memory_budget
from .._progress import Progress
from .._source import Source, check_comparable
from .._validate import PROGRESS, Bool, Int, OneOf, Strings, check_options, validated
from ..errors import (
    Interrupted,
    InvalidArgumentError,
    LayerscopeError,
    MemoryBudgetError,
    MismatchError,
)
from ..measures import alignment, cka, intrinsic_dimensions, spectrum
from ..results import _jsonable, atomic_write_text, result_from_dict
from ..store import ActivationStore, open_store
from ._lock import LOCK_NAME, FolderLock
from .figures import write_index
from .table import COLUMNS, Row, item_rows, to_csv

__all__ = ["batch", "BatchResult", "MEASURES", "PAIRS", "add_cli"]

#: What ``measures=`` may name: the pair measures (``cka``, ``align``: per store pair, or per
#: store with itself under ``pairs="each"``) and the store measures (``id``, ``spectrum``:
#: once per store, whatever ``pairs`` is).
MEASURES = ("cka", "id", "spectrum", "align")
#: ``pairs=``: each store against the reference, consecutive stores in the given order, all
#: pairs, or each store with itself (within-store tables).
PAIRS = ("reference", "consecutive", "all", "each")
PAIR_MEASURES = ("cka", "align")
_FUNCS: dict[str, Callable[..., Any]] = {
    "cka": cka, "align": alignment, "id": intrinsic_dimensions, "spectrum": spectrum}
_NOT_OPTIONS = {"source", "other", "progress"}
ITEM_FORMAT = 1
CSV_EVERY = 5.0  # seconds between rewrites of results.csv while items finish


@dataclass(frozen=True)
class Item:
    """One unit of work: ``measure`` on store ``a`` (and ``b``: a pair measure; ``b == a``
    for a within-store table; None for a store measure)."""

    measure: str
    a: str
    b: str | None

    def __str__(self) -> str:
        return f"{self.measure} {self.a}" + ("" if self.b is None else f" × {self.b}")


@dataclass
class _Store:
    label: str
    store: ActivationStore
    fingerprint: str


def _stem(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "store"


def _labels(paths: list[Path], labels: Sequence[str] | None) -> list[str]:
    """User labels, else the folder names, lengthened with parent folders until unique."""
    if labels is not None:
        if len(labels) != len(paths):
            raise InvalidArgumentError(
                f"layerscope.batch: {len(labels)} labels for {len(paths)} stores")
        out = [str(x) for x in labels]
    else:
        depth = 1
        while True:
            out = ["/".join(p.parts[-depth:]) for p in paths]
            if len(set(out)) == len(out) or depth >= max(len(p.parts) for p in paths):
                break
            depth += 1
    stems = [_stem(x) for x in out]
    if len(set(stems)) != len(stems) or any(not x for x in out):
        raise InvalidArgumentError(
            f"layerscope.batch: the store labels {out} are not distinct as file names; pass "
            "labels=[...] (CLI --labels)")
    return out


def _route(measures: list[str], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each measure's keyword arguments: ``cka={...}``-style dicts go to their measure;
    every other option to each selected measure that takes it (an option none takes, or
    ``k``, which means neighbours for ``id`` and kept directions for ``align``, is refused
    when ambiguous)."""
    params = {m: set(_params(_FUNCS[m])) for m in MEASURES}
    out: dict[str, dict[str, Any]] = {m: {} for m in measures}
    flat = {k: v for k, v in options.items() if k not in MEASURES}
    for name, value in flat.items():
        takers = [m for m in measures if name in params[m]]
        if not takers:
            known = sorted(set().union(*(params[m] for m in measures)))
            raise InvalidArgumentError(
                f"layerscope.batch: no selected measure ({', '.join(measures)}) takes {name}=; "
                f"their options are {', '.join(known)}")
        if name == "k" and len(takers) > 1:
            raise InvalidArgumentError(
                "layerscope.batch: k= means neighbours for id and kept directions for align; "
                "pass id={'k': ...} and align={'k': ...}")
        for m in takers:
            out[m][name] = value
    for m in MEASURES:
        if m not in options:
            continue
        own = options[m]
        if not isinstance(own, Mapping):
            raise InvalidArgumentError(
                f"layerscope.batch: {m}= must be a dict of {m} options, got {type(own).__name__}")
        if m not in measures:
            raise InvalidArgumentError(
                f"layerscope.batch: {m}= given but {m!r} is not in measures={measures}")
        bad = sorted(set(own) - params[m])
        if bad:
            raise InvalidArgumentError(
                f"layerscope.batch: {m} does not take {bad}; it takes "
                f"{', '.join(sorted(params[m]))}")
        out[m].update(own)
    return {m: check_options(_FUNCS[m], opts) for m, opts in out.items()}


def _params(fn: Callable[..., Any]) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p not in _NOT_OPTIONS]


def plan_items(labels: list[str], pairs: str, reference: int,
               measures: list[str]) -> list[Item]:
    """The items of a batch, in the order of the table."""
    n = len(labels)
    if pairs == "reference":
        pl = [(labels[reference], labels[i]) for i in range(n) if i != reference]
    elif pairs == "consecutive":
        pl = [(labels[i], labels[i + 1]) for i in range(n - 1)]
    elif pairs == "all":
        pl = [(labels[i], labels[j]) for i in range(n) for j in range(i + 1, n)]
    else:
        pl = [(x, x) for x in labels]
    items = []
    for m in measures:
        if m in PAIR_MEASURES:
            items += [Item(m, a, b) for a, b in pl]
        else:
            items += [Item(m, a, None) for a in labels]
    return items


class BatchResult:
    """What :func:`batch` did. ``path`` (the folder), ``csv`` (``results.csv``), ``index``
    (``index.html``), ``rows``
    (the tidy table: tuples in the order of ``layerscope.batch.table.COLUMNS``),
    ``computed`` / ``skipped`` (items run now / found done), ``failed`` (item → the error
    message: those items are not in the table; a rerun retries them), ``labels``."""

    columns = COLUMNS

    def __init__(self, path: Path, rows: list[Row], computed: list[Item], skipped: list[Item],
                 failed: dict[Item, str], labels: list[str]) -> None:
        self.path = path
        self.csv = path / "results.csv"
        self.index = path / "index.html"
        self.rows = rows
        self.computed = computed
        self.skipped = skipped
        self.failed = failed
        self.labels = labels

    def to_pandas(self) -> Any:
        """The tidy table as a pandas DataFrame (needs the ``plot`` extra)."""
        from .._optional import require

        pd = require("pandas", "BatchResult.to_pandas()")
        return pd.DataFrame(self.rows, columns=list(COLUMNS))

    def result(self, measure: str, a: str, b: str | None = None) -> Any:
        """An item's full result loaded from its JSON (``id``: ``{method: IDResult}``)."""
        item = Item(measure, a, b if b is not None or measure not in PAIR_MEASURES else a)
        data = _read_item(_item_path(self.path, item))
        if data is None:
            raise InvalidArgumentError(f"{self.path}: no finished item {item}")
        res = _results(data)
        return res if measure == "id" else next(iter(res.values()))

    def __repr__(self) -> str:
        return (f"<BatchResult {self.path}: {len(self.rows)} rows, {len(self.computed)} "
                f"computed, {len(self.skipped)} already done, {len(self.failed)} failed>")


def _item_path(folder: Path, item: Item) -> Path:
    name = _stem(item.a) + ("" if item.b is None else f"__{_stem(item.b)}")
    return folder / "items" / item.measure / f"{name}.json"


def _results(data: dict[str, Any]) -> dict[str, Any]:
    """An item file's results, restored to their classes."""
    return {k: result_from_dict(v) for k, v in data["results"].items()}


def _read_item(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == ITEM_FORMAT else None


def _is_done(data: dict[str, Any] | None, item: Item, prints: dict[str, str],
             options: dict[str, Any]) -> bool:
    """An item file counts as done when it is this item, read the same store contents
    (fingerprints) and ran with the same options."""
    return (data is not None and data.get("measure") == item.measure
            and data.get("store_a") == item.a and data.get("store_b") == item.b
            and data.get("fingerprints") == prints and data.get("options") == options
            and isinstance(data.get("results"), dict))


def _canonical(options: dict[str, Any]) -> dict[str, Any]:
    """Options as they compare after a JSON round trip (tuples → lists, numpy → Python)."""
    return json.loads(json.dumps(_jsonable(options), sort_keys=True))


def _resolve_reference(reference: Any, paths: list[Path], labels: list[str] | None
                       ) -> tuple[int, Path | None]:
    """(index of the reference among the stores, or -1 with a path to put first)."""
    if reference is None:
        return 0, None
    if isinstance(reference, ActivationStore):
        reference = reference.path
    if not isinstance(reference, (str, os.PathLike)):
        raise InvalidArgumentError(
            f"layerscope.batch: reference= must be a store path or a label, got "
            f"{type(reference).__name__}")
    if labels is not None and str(reference) in labels:
        return labels.index(str(reference)), None
    real = Path(os.path.realpath(reference))
    for i, p in enumerate(paths):
        if Path(os.path.realpath(p)) == real:
            return i, None
    if labels is None and str(reference) in [p.name for p in paths]:
        return [p.name for p in paths].index(str(reference)), None
    return -1, Path(reference)


def _check_folder(out: Path) -> None:
    """``out`` is new, empty, or a batch folder: never mix results into someone's files."""
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"{out}: exists and is not a folder")
    if out.is_dir():
        names = set(os.listdir(out))
        if names and not names & {"batch.json", "items", LOCK_NAME}:
            raise InvalidArgumentError(
                f"{out}: not empty and not a layerscope batch folder (no batch.json); "
                "choose a new or empty folder")


def _clean_temps(out: Path) -> None:
    """Temp files of writes cut short by a kill (their renames never happened)."""
    for folder in [out, out / "figures", *(out / "items").glob("*")]:
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


@validated(pairs=OneOf(*PAIRS), measures=Strings(options=MEASURES), resume=Bool(),
           labels=(None, Strings("a label")), workers=(None, Int(1)), figures=Bool(),
           progress=PROGRESS)
def batch(
    stores: Sequence[Any],
    *,
    out: str | os.PathLike[str],
    pairs: str = "reference",
    reference: Any = None,
    measures: Sequence[str] = ("cka",),
    resume: bool = True,
    labels: Sequence[str] | None = None,
    workers: int | None = None,
    figures: bool = True,
    progress: Any = True,
    **measure_options: Any,
) -> BatchResult:
    """Run ``measures`` over many stores into the folder ``out`` (resumable; see the module
    docstring for the files).

    Args:
        stores: store paths (or opened stores), in run order (checkpoints: by step).
        out: the batch folder (new, empty, or one a previous batch wrote).
        pairs: which store pairs the pair measures (``cka``, ``align``) compare:
            ``"reference"`` (each store against ``reference``), ``"consecutive"`` (each
            store against the next), ``"all"`` (every pair once) or ``"each"`` (each store's
            own layer × layer table). Pairs must share row ids (checked for every pair before
            any work: :class:`~layerscope.errors.MismatchError` names the pair).
        reference: the reference store: a path, a label, or None (the first store); a path
            not among ``stores`` is added in front of them.
        measures: any of ``"cka"`` (:func:`layerscope.cka`), ``"align"``
            (:func:`layerscope.alignment`), ``"id"`` (:func:`layerscope.intrinsic_dimensions`,
            per store) and ``"spectrum"`` (:func:`layerscope.spectrum`, per store).
        resume: skip items already finished with the same store fingerprints and options
            (False: recompute every item).
        labels: the stores' names in the table and figures (default: folder names, with
            parent folders added until they are distinct).
        workers: items run at the same time (default: 2 when there are several items, each
            then planned within half of the memory budget; an item refused at that share
            runs again, alone, with all of it). Each item is itself parallel in Rust.
        figures: draw the figures of ``DIR/index.html`` (needs matplotlib, the ``plot``
            extra; without it the page says so and shows the run only).
        progress: one bar over items (True), none (False), or ``cb(done, total)``.
        **measure_options: options of the measures: a name that a selected measure's
            function takes goes to every selected measure that takes it (``seed=``,
            ``sample=``, ``layers=``, ``max_memory=`` — the batch's whole budget); a dict
            under a measure's name goes to that measure only (``cka={"estimator":
            "debiased"}``, ``id={"methods": ["twonn"], "k": 10}``). Checked before any work.

    Returns:
        A :class:`BatchResult` (the table, and what was computed, skipped and failed).
    """
    if isinstance(stores, (str, os.PathLike, ActivationStore)):
        stores = [stores]
    paths = [Path(s.path) if isinstance(s, ActivationStore) else Path(s) for s in stores]
    if not paths:
        raise InvalidArgumentError("layerscope.batch: no stores given")
    ref, extra = _resolve_reference(reference, paths, list(labels) if labels else None)
    if extra is not None:
        if labels is not None:
            raise InvalidArgumentError(
                "layerscope.batch: with labels=, reference= must be one of the stores")
        stores, paths, ref = [extra, *stores], [extra, *paths], 0
    reals = [os.path.realpath(p) for p in paths]
    if len(set(reals)) != len(reals):
        dup = next(p for p, r in zip(paths, reals) if reals.count(r) > 1)
        raise InvalidArgumentError(f"layerscope.batch: {dup} is given twice")
    measures = list(dict.fromkeys(measures))
    # the budget is how the work is split, not what it computes: not part of an item's options
    max_memory = max_memory_bytes(measure_options.pop("max_memory", None))
    options = _route(measures, measure_options)
    for m, opts in options.items():
        if "max_memory" in opts:
            raise InvalidArgumentError(
                f"layerscope.batch: give max_memory= once, for the whole batch (not in {m}=)")
    names = _labels(paths, labels)
    opened = {}
    for s, name in zip(stores, names):
        st = s if isinstance(s, ActivationStore) else open_store(s)
        opened[name] = _Store(name, st, st.fingerprint())
    items = plan_items(names, pairs, ref, measures)
    if not items:
        raise InvalidArgumentError(
            f"layerscope.batch: pairs={pairs!r} over {len(names)} store(s) gives nothing to "
            "compute (give at least two stores, or pairs='each')")
    out = Path(out)
    files = [_item_path(out, it) for it in items]
    if len(set(files)) != len(files):
        raise InvalidArgumentError(
            f"layerscope.batch: the labels {names} give two items one file name (a label "
            "with '__'?); pass other labels=[...]")
    _check_pairs(items, opened)
    _check_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out):
        _clean_temps(out)
        run = _Run(out, items, opened, options, max_memory, workers, progress)
        return run.run(resume, pairs, measures, names, names[ref], figures)


def _check_pairs(items: list[Item], opened: dict[str, _Store]) -> None:
    seen = set()
    for it in items:
        if it.b is None or it.b == it.a or (it.a, it.b) in seen:
            continue
        seen.add((it.a, it.b))
        try:
            check_comparable(Source(store=opened[it.a].store), Source(store=opened[it.b].store))
        except MismatchError as e:
            raise MismatchError(f"layerscope.batch: {it.a} and {it.b}: {e}") from None


class _Run:
    """One batch run under the folder lock: which items are done, the workers, the table."""

    def __init__(self, out: Path, items: list[Item], stores: dict[str, _Store],
                 options: dict[str, dict[str, Any]], max_memory: Any, workers: int | None,
                 progress: Any) -> None:
        self.out = out
        self.items = items
        self.stores = stores
        self.options = {m: _canonical(o) for m, o in options.items()}
        self.raw_options = options
        self.max_memory = max_memory
        self.workers = workers
        self.progress = progress
        self.rows: dict[Item, list[Row]] = {}
        self.cancel = threading.Event()
        self.last_csv = 0.0

    def prints(self, item: Item) -> dict[str, str]:
        keys = [item.a] if item.b is None or item.b == item.a else [item.a, item.b]
        return {k: self.stores[k].fingerprint for k in keys}

    def run(self, resume: bool, pairs: str, measures: list[str], names: list[str],
            reference: str, figures: bool) -> BatchResult:
        skipped, todo = [], []
        for item in self.items:
            data = _read_item(_item_path(self.out, item)) if resume else None
            if _is_done(data, item, self.prints(item), self.options[item.measure]):
                assert data is not None
                self.rows[item] = self._rows(item, data)
                skipped.append(item)
            else:
                todo.append(item)
        spec = {"format": ITEM_FORMAT, "pairs": pairs, "measures": measures,
                "stores": [{"label": n, "path": str(self.stores[n].store.path),
                            "fingerprint": self.stores[n].fingerprint} for n in names],
                "options": self.options}
        atomic_write_text(self.out / "batch.json", json.dumps(
            {**spec, "state": "running", "items": len(self.items)}, indent=2))
        failed: dict[Item, str] = {}
        computed: list[Item] = []
        with Progress(self.progress, "batch", unit="item") as bar:
            done = len(skipped)
            if bar.cb:
                bar.cb(done, len(self.items))
            for item, error in self._execute(todo):
                if error is None:
                    computed.append(item)
                else:
                    failed[item] = error
                done += 1
                if bar.cb:
                    bar.cb(done, len(self.items))
                self._write_csv(final=False)
        self._write_csv(final=True)
        atomic_write_text(self.out / "batch.json", json.dumps(
            {**spec, "state": "finished", "items": len(self.items),
             "computed": [str(i) for i in computed], "skipped": [str(i) for i in skipped],
             "failed": {str(i): e for i, e in failed.items()}}, indent=2))
        stores = [{"label": n, "path": str(s.store.path), "rows": s.store.num_rows,
                   "layers": len(s.store.layers), "fingerprint": s.fingerprint,
                   "dtype": "/".join(sorted(set(s.store.dtypes.values())))}
                  for n, s in ((n, self.stores[n]) for n in names)]
        counts = {"computed": len(computed), "skipped": len(skipped), "failed": len(failed)}
        write_index(self.out, self._table(), names, pairs, reference, measures,
                    self.options, stores, counts, {str(i): e for i, e in failed.items()},
                    figures)
        return BatchResult(self.out, self._table(), computed, skipped, failed, names)

    # ------------------------------------------------------------------ running items

    def _execute(self, todo: list[Item]) -> Iterator[tuple[Item, str | None]]:
        """Run ``todo``; yield (item, None) or (item, error message) as each finishes."""
        workers = self.workers or (2 if len(todo) > 1 else 1)
        workers = min(workers, max(len(todo), 1))
        retry: list[Item] = []
        if workers > 1:
            share = memory_budget(self.max_memory).bytes // workers
            pool = ThreadPoolExecutor(workers, thread_name_prefix="layerscope-batch")
            try:
                running: dict[Future[None], Item] = {}
                queue = list(todo)
                while queue or running:
                    while queue and len(running) < workers:
                        it = queue.pop(0)
                        running[pool.submit(self._one, it, share, self._cancel_cb)] = it
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        it = running.pop(fut)
                        err = self._outcome(fut)
                        if isinstance(err, MemoryBudgetError):
                            retry.append(it)  # again, alone, with the whole budget
                        else:
                            yield it, err
            except BaseException:
                self.cancel.set()  # running items stop at their next progress check
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            retry = todo
        for it in retry:
            try:
                self._one(it, self.max_memory, False)
                yield it, None
            except Interrupted:
                raise
            except LayerscopeError as e:
                yield it, f"{type(e).__name__}: {e}"

    def _outcome(self, fut: Future[None]) -> Any:
        """None, a MemoryBudgetError (to retry alone), or an error message (a
        LayerscopeError fails its item only: a constant layer, a k above a layer's rank);
        Ctrl-C or a bug ends the batch."""
        exc = fut.exception()
        if exc is None:
            return None
        if isinstance(exc, MemoryBudgetError):
            return exc
        if isinstance(exc, LayerscopeError) and not isinstance(exc, Interrupted):
            return f"{type(exc).__name__}: {exc}"
        raise exc

    def _cancel_cb(self, done: int, total: int) -> None:
        if self.cancel.is_set():
            raise KeyboardInterrupt

    def _one(self, item: Item, max_memory: Any, progress: Any) -> None:
        """Compute one item and write its file (atomically)."""
        t0 = time.perf_counter()
        opts = {**self.raw_options[item.measure], "max_memory": max_memory}
        fn = _FUNCS[item.measure]
        a = self.stores[item.a].store
        if item.measure in PAIR_MEASURES:
            other = None if item.b == item.a else self.stores[item.b or item.a].store
            res: Any = {item.measure: fn(a, other, progress=progress, **opts)}
        elif item.measure == "id":
            res = fn(a, progress=progress, **opts)
        else:
            res = {"spectrum": fn(a, progress=progress, **opts)}
        data = {"format": ITEM_FORMAT, "measure": item.measure, "store_a": item.a,
                "store_b": item.b, "fingerprints": self.prints(item),
                "options": self.options[item.measure],
                "seconds": time.perf_counter() - t0,
                "results": {k: r.to_dict() for k, r in res.items()}}
        atomic_write_text(_item_path(self.out, item), json.dumps(data, allow_nan=False))
        self.rows[item] = item_rows(item.measure, item.a, item.b,
                                    self.options[item.measure], res)

    def _rows(self, item: Item, data: dict[str, Any]) -> list[Row]:
        return item_rows(item.measure, item.a, item.b, self.options[item.measure],
                         _results(data))

    # ------------------------------------------------------------------ the table

    def _table(self) -> list[Row]:
        return [r for it in self.items for r in self.rows.get(it, [])]

    def _write_csv(self, final: bool) -> None:
        now = time.monotonic()
        if final or now - self.last_csv >= CSV_EVERY:
            atomic_write_text(self.out / "results.csv", to_csv(self._table()))
            self.last_csv = now


def add_cli(sub: Any) -> None:
    """``layerscope batch``."""
    from .cli import add_cli as add

    add(sub)
