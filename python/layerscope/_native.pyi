"""Type stubs of the compiled extension ``layerscope._native`` (PyO3)."""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

ProgressCallback = Callable[[int, int], Any] | None

# ---- store (rust/python/src/store.rs) ----

class NativeBlocks:
    """Iterator of ``(start, {layer: block})`` (``NativeStore.blocks``)."""

    def __iter__(self) -> NativeBlocks: ...
    def __next__(self) -> tuple[int, dict[str, npt.NDArray[np.floating[Any]]]]: ...

class NativeStore:
    """A validated, memory-mapped activation store (see docs/FORMAT.md)."""

    @staticmethod
    def open(path: str, verify: bool = False) -> NativeStore: ...
    @property
    def path(self) -> str: ...
    @property
    def layers(self) -> list[str]: ...
    @property
    def dims(self) -> list[int]: ...
    @property
    def dtypes(self) -> list[str]: ...
    @property
    def num_rows(self) -> int: ...
    @property
    def columns(self) -> list[str]: ...
    @property
    def complete(self) -> bool: ...
    @property
    def total_bytes(self) -> int: ...
    @property
    def metadata_json(self) -> str: ...
    @property
    def shards(self) -> list[dict[str, Any]]: ...
    def layer_index(self, name: str) -> int: ...
    def row_ids(self) -> npt.NDArray[np.int64]: ...
    def column(self, name: str) -> npt.NDArray[np.int64] | None: ...
    def read(
        self, layer: str, start: int, stop: int, dtype: str = "float32"
    ) -> npt.NDArray[np.floating[Any]]: ...
    def take(
        self, layer: str, indices: npt.NDArray[np.int64], dtype: str = "float64"
    ) -> npt.NDArray[np.floating[Any]]: ...
    def read_block(
        self,
        layers: list[str],
        start: int,
        stop: int,
        dtype: str = "float32",
        release: bool = False,
    ) -> list[npt.NDArray[np.floating[Any]]]: ...
    def blocks(
        self,
        layers: list[str],
        block_rows: int,
        dtype: str = "float32",
        release: bool = True,
        reuse: bool = False,
    ) -> NativeBlocks: ...
    def read_block_into(
        self,
        layers: list[str],
        start: int,
        stop: int,
        outs: list[npt.NDArray[np.floating[Any]]],
        release: bool = False,
    ) -> None: ...
    def release(self, start: int, stop: int) -> None: ...
    def find_nonfinite(self, layer: str) -> int | None: ...
    def verify(self) -> None: ...

class NativeWriter:
    """Incremental atomic store writer."""

    @staticmethod
    def create(
        path: str, shard_bytes: int, overwrite: bool, metadata_json: str, dtype: str | None = None
    ) -> NativeWriter: ...
    def append(
        self,
        layers: Sequence[tuple[str, npt.NDArray[Any], str]],
        row_ids: npt.NDArray[np.int64] | None = None,
        columns: Sequence[tuple[str, npt.NDArray[np.int64]]] = ...,
    ) -> None: ...
    @property
    def rows_appended(self) -> int: ...
    @property
    def rows_committed(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...

# ---- moments (rust/python/src/moments.rs) ----

class MomentAccumulator:
    """Streaming f64 moments of concatenated layers (mergeable, serialisable)."""

    def __init__(
        self,
        dims: Sequence[int],
        names: Sequence[str] | None = None,
        check_finite: bool = True,
        compute: str = "float64",
    ) -> None: ...
    def update(self, arrays: Sequence[npt.NDArray[np.floating]]) -> None: ...
    def set_shift(self, shift: Sequence[float] | np.ndarray) -> None: ...
    def merge(self, other: MomentAccumulator) -> None: ...
    def to_bytes(self) -> bytes: ...
    @staticmethod
    def from_bytes(data: bytes) -> MomentAccumulator: ...
    @property
    def n(self) -> int: ...
    @property
    def dims(self) -> list[int]: ...
    @property
    def names(self) -> list[str]: ...
    def finalize(self, num_a: int | None = None) -> Moments: ...

class Moments:
    """Finalised moments: centred cross-product matrix C of all layers, means, rr."""

    @property
    def n(self) -> int: ...
    @property
    def dims(self) -> list[int]: ...
    @property
    def names(self) -> list[str]: ...
    @property
    def num_a(self) -> int: ...
    @property
    def num_b(self) -> int: ...
    @property
    def shift_offset(self) -> float: ...
    @property
    def nonfinite(self) -> list[int | None]: ...
    def cross_products(self) -> npt.NDArray[np.float64]:
        """The D × D centred cross-product matrix C (read-only view; for inspection)."""
    def spectrum(
        self, layers: Sequence[int] | None = None, *, pca_threshold: float | None = None,
        max_memory: int | None = None, progress: ProgressCallback = None,
    ) -> list[dict[str, Any]]:
        """Per-layer spectrum measures (measures::spectrum); `pca_id` at `pca_threshold`."""
    def alignment(
        self, rows: Sequence[int], cols: Sequence[int] | None = None, *,
        method: str = "subspace", space: str = "samples", k: int | None = None,
        variance: float | None = None, ridge_eps: float = 1e-4, symmetric: bool = False,
        spectrum_layers: Sequence[int] = (), max_memory: int | None = None,
        progress: ProgressCallback = None,
    ) -> dict[str, Any]:
        """{"alignment": rows × cols measures (measures::align), "spectra": [...]}."""
    def block(self, i: int, j: int) -> npt.NDArray[np.float64]: ...
    def mean(self, i: int) -> npt.NDArray[np.float64]: ...
    def rr(self, k: int, l: int) -> float: ...
    def trace(self, k: int) -> float: ...
    def cka(
        self, rows: Sequence[int], cols: Sequence[int], debiased: bool = False
    ) -> npt.NDArray[np.float64]: ...

#: One part of a streaming pass: a store selection ``(NativeStore, [layer index])`` or
#: in-memory layers ``[(array, "F32" | "F64" | "F16" | "BF16")]`` (2-D, elements contiguous
#: within a row, rows evenly spaced; F16/BF16 as uint16 bit patterns), borrowed, not copied.
Part = tuple[NativeStore, Sequence[int]] | Sequence[tuple[npt.NDArray[Any], str]]

def moments_pass(
    parts: Sequence[Part],
    names: Sequence[str],
    block_rows: int | None = None,
    check_finite: bool = True,
    max_memory: int | None = None,
    num_a: int | None = None,
    progress: ProgressCallback = None,
    compute: str = "float64",
) -> Moments: ...
class PairStats:
    """What linear CKA needs of every layer pair (``‖C_ij‖²``, ``Σ r̄_i r̄_j``, ``tr C_ii``,
    ``n``), from one pass or summed over the tiles of a tiled pass, and its plan."""

    @property
    def n(self) -> int: ...
    @property
    def dims(self) -> list[int]: ...
    @property
    def names(self) -> list[str]: ...
    @property
    def num_a(self) -> int: ...
    @property
    def num_b(self) -> int: ...
    @property
    def shift_offset(self) -> float: ...
    @property
    def nonfinite(self) -> list[int | None]: ...
    @property
    def strategy(self) -> str: ...
    @property
    def passes(self) -> int: ...
    @property
    def peak_bytes(self) -> int: ...
    @property
    def block_rows(self) -> int: ...
    @property
    def layer_reads(self) -> list[int]: ...
    @property
    def madds(self) -> int: ...
    def cka(
        self, rows: Sequence[int], cols: Sequence[int], debiased: bool = False
    ) -> npt.NDArray[np.float64]: ...

def pair_pass(
    parts: Sequence[Part],
    names: Sequence[str],
    num_a: int,
    block_rows: int | None = None,
    check_finite: bool = True,
    max_memory: int | None = None,
    progress: ProgressCallback = None,
    compute: str = "float64",
    strategy: str | None = None,
) -> PairStats: ...
def default_block_rows(dims: Sequence[int], compute: str = "float64") -> int: ...
def pass_bytes(dims: Sequence[int], block_rows: int, compute: str = ...) -> int: ...
def accumulator_bytes(dims: Sequence[int]) -> int: ...

PAIR_STRATEGIES: list[str]

def pair_plan(
    dims: Sequence[int],
    num_a: int,
    n: int,
    block_rows: int | None = None,
    compute: str = "float64",
    max_memory: int | None = None,
    strategy: str | None = None,
) -> dict[str, Any]:
    """The plan of an exact all-pairs linear pass, nothing read: strategy, passes,
    peak_bytes, block_rows, layer_reads, madds, cost_seconds, budget_bytes, budget_source."""

def measured_madds_per_s(compute: str = "float64", seconds: float = 0.2) -> float:
    """Multiply-adds per second of the packed product kernel on this machine."""

# ---- minibatch cka (rust/python/src/cka.rs) ----

class MinibatchCka:
    """Streaming minibatch CKA (Nguyen et al. 2021): unbiased HSIC (Song et al. 2012)
    averaged over consecutive minibatches of ``batch_size`` rows; linear or RBF kernel."""

    def __init__(
        self,
        dims: Sequence[int],
        names: Sequence[str] | None = None,
        kernel: str = "linear",
        sigma: float = 1.0,
        batch_size: int = 256,
        num_a: int | None = None,
        check_finite: bool = True,
        max_memory: int | None = None,
    ) -> None: ...
    def update(self, arrays: Sequence[npt.NDArray[np.floating]]) -> None: ...
    @property
    def rows_seen(self) -> int: ...
    def finish(self) -> dict[str, Any]: ...

DEFAULT_BATCH_SIZE: int
"""Rows per minibatch of the minibatch CKA when none is given."""

def minibatch_bytes(dims: Sequence[int], batch_size: int) -> int:
    """Peak bytes of the minibatch estimator's state."""

def minibatch_cka_pass(
    parts: Sequence[Part],
    names: Sequence[str],
    kernel: str = "linear",
    sigma: float = 1.0,
    batch_size: int = 256,
    num_a: int | None = None,
    check_finite: bool = True,
    max_memory: int | None = None,
    block_rows: int | None = None,
    progress: ProgressCallback = None,
    sample: Sequence[int] | None = None,
) -> dict[str, Any]: ...

# ---- alignment (rust/python/src/align.rs) ----

DEFAULT_ALIGN_K: int
"""Leading directions kept by alignment when neither k nor variance is given."""

def eigs_bytes(dims: Sequence[int]) -> int:
    """Peak bytes of the eigendecompositions of layers of widths dims."""

# ---- neighbours (rust/python/src/neighbors.rs) ----

def knn_graph(
    x: npt.NDArray[np.float64], k: int, duplicates: str = "drop", tolerance: float | None = None,
    max_memory: int | None = None, progress: ProgressCallback = None,
) -> dict[str, Any]:
    """Exact kNN graph with duplicate handling: {dist, idx, kept, duplicates, tolerance}."""

def knn_bytes(m: int, d: int, k: int) -> int:
    """Peak bytes of an exact kNN graph of m points of width d with k neighbours."""

def rbf_hsic_bytes(layers: int, m: int, dmax: int) -> int:
    """Peak bytes of the RBF HSIC of `layers` Grams of m rows (widest layer dmax)."""

def id_estimate(
    dist: npt.NDArray[np.float64], method: str, *, discard_fraction: float = 0.1, k: int = 20,
    pool: str = "harmonic", n1: int = 1, n2: int = 2, bootstrap: int = 0, seed: int = 0,
) -> dict[str, Any]:
    """ID from sorted kNN distances: {value, error, ci, n_used, reason}."""

def rbf_hsic(
    a: Sequence[npt.NDArray[np.float64]], b: Sequence[npt.NDArray[np.float64]] | None = None, *,
    sigma: float = 1.0, unbiased: bool = False, max_memory: int | None = None, progress: ProgressCallback = None,
) -> dict[str, Any]:
    """RBF CKA for all layer pairs: {values (CKA, NaN rule of measures::hsic), xy (HSIC), xx, yy,
    bw_a, bw_b}."""

def rsa_matrix(
    a: Sequence[npt.NDArray[np.float64]], b: Sequence[npt.NDArray[np.float64]] | None = None, *,
    dissimilarity: str = "euclidean", compare: str = "spearman", max_memory: int | None = None,
    progress: ProgressCallback = None,
) -> npt.NDArray[np.float64]: ...

def mutual_knn_matrix(
    a: Sequence[npt.NDArray[np.float64]], b: Sequence[npt.NDArray[np.float64]] | None = None, *,
    k: int = 10, normalize: bool = False, max_memory: int | None = None,
    progress: ProgressCallback = None,
) -> npt.NDArray[np.float64]: ...

# ---- memory budget (rust/python/src/memory.rs) ----

MEMORY_BUDGET_FRACTION: float
MEMORY_ENV_VAR: str

def memory_budget(max_memory: int | None = None) -> tuple[int, str]:
    """(bytes, source) of the budget in force: max_memory, else LAYERSCOPE_MAX_MEMORY, else
    MEMORY_BUDGET_FRACTION of the smallest of MemAvailable, the cgroup limit and the
    RLIMIT_AS headroom."""

def parse_memory_size(text: str) -> int:
    """Bytes of "512M", "4G", "1.5GiB", "800MB", "4096" (InvalidArgumentError otherwise)."""

def check_budget(need: int, what: str, advice: str, max_memory: int | None = None) -> None:
    """MemoryBudgetError when need bytes exceed the budget in force."""

def check_moment_memory(
    dims: Sequence[int], block_rows: int, compute: str = "float64", max_memory: int | None = None,
) -> tuple[int, str]:
    """MemoryBudgetError (saying how many layers fit) when a moment pass does not fit;
    returns (budget bytes, source)."""
