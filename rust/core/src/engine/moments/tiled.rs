//! Tiled passes: the exact all-pairs moments of layers whose single-pass accumulator
//! (`(D + L)² · 8` bytes: 146 GB for 33 × 4096) does not fit the memory budget.
//!
//! # Plan ([`plan_tiles`])
//! Every layer is one *piece*, or — when it is too wide for the budget on its own — several
//! pieces of consecutive feature columns. Pieces are packed, in order, into *groups* of at most
//! `W` columns (plus one squared-norm column per piece), `W` the widest group whose tiles fit
//! the budget. The tiles are the passes:
//! * `Diag(g)`: one group alone, a [`MomentAccumulator`] (SYRK of the group): every pair
//!   inside the group;
//! * `Cross(g, h)`: two groups side by side, a [`CrossAccumulator`] (GEMM of the cross block
//!   only): every pair `(p ∈ g, q ∈ h)`.
//!
//! Within one source every pair of groups is a tile; across two sources (`other=`) the tiles
//! are every group with itself, every `A` group with every `B` group, and two groups of one
//! side only when they hold pieces of the same (split) layer. Each pair of pieces is thus
//! computed exactly once: the multiply-adds are those of the single pass (`n · D² / 2` within
//! a source), while the bytes read grow with the number of tiles a layer appears in.
//!
//! # What a tiled pass gives ([`run_tiled`])
//! The [`PairStats`] of the layers: `‖C_xy‖_F² = Σ_{p ∈ x, q ∈ y} ‖C_pq‖_F²`,
//! `Σ_a r̄_x r̄_y = Σ_{p, q} Σ_a r̄_p r̄_q` (the squared norm of a layer's centred row is the
//! sum of its pieces'), `tr C_xx = Σ_p tr C_pp`: linear CKA, biased and debiased, of every
//! pair asked for — the same numbers as one pass, to rounding. Each tile has its own reference
//! shift (the same sampled rows, so the same shift for the same columns).
use super::gram::GramPlan;
use super::pairs::PairStats;
use super::partial::PairStatsBuilder;
use super::pass::accumulate;
use super::plan::{cross_pass_bytes, default_block_rows_for, pair_sides, pass_bytes, PassShape};
use super::state::Compute;
use crate::error::{Error, Result};
use crate::memory::{fmt_bytes, Budget};
use crate::monitor::Monitor;
use crate::store::stream::RowSource;
use std::ops::Range;

/// A piece: feature columns `cols` of layer `layer`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Piece {
    pub layer: usize,
    pub cols: Range<usize>,
}

/// One pass of a tiled plan (indices into [`TilePlan::groups`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Tile {
    Diag(usize),
    Cross(usize, usize),
}

/// The tiles of an exact all-pairs pass within a memory budget (see the module docs).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TilePlan {
    pub dims: Vec<usize>,
    /// Layers `0..num_a` are the first source's, the rest the second's.
    pub num_a: usize,
    pub pieces: Vec<Piece>,
    /// Piece indices of each group.
    pub groups: Vec<Vec<usize>>,
    pub tiles: Vec<Tile>,
    pub block_rows: usize,
    pub compute: Compute,
    /// The largest tile's peak bytes ([`pass_bytes`] / [`cross_pass_bytes`]).
    pub peak_bytes: u128,
}

/// The narrowest piece the planner makes of a wide layer (a layer narrower than this is never
/// split): below it, the number of tiles (and of reads of the data) grows past any use.
pub const MIN_PIECE_COLUMNS: usize = 128;

/// The fewest rows per block a tiled plan shrinks its blocks to when the budget is tight.
pub const MIN_TILE_BLOCK_ROWS: usize = 256;

impl TilePlan {
    /// Number of passes over the rows.
    pub fn passes(&self) -> usize {
        self.tiles.len()
    }

    /// Widths of the pieces of group `g`.
    pub fn group_dims(&self, g: usize) -> Vec<usize> {
        self.groups[g]
            .iter()
            .map(|&p| self.pieces[p].cols.len())
            .collect()
    }

    /// How many passes read each layer (a layer with several pieces in one tile is read
    /// once per block of that tile).
    pub fn layer_reads(&self) -> Vec<u64> {
        let mut reads = vec![0u64; self.dims.len()];
        for t in &self.tiles {
            let gs: Vec<usize> = match *t {
                Tile::Diag(g) => vec![g],
                Tile::Cross(g, h) => vec![g, h],
            };
            let mut layers: Vec<usize> = gs
                .iter()
                .flat_map(|&g| self.groups[g].iter().map(|&p| self.pieces[p].layer))
                .collect();
            layers.dedup();
            for l in layers {
                reads[l] += 1;
            }
        }
        reads
    }

    /// Multiply-adds per row of all tiles (the packed products: `d_g (d_g + 1) / 2` per
    /// diagonal tile of `d_g` columns, `d_g · d_h` per cross tile).
    pub fn madds_per_row(&self) -> u128 {
        let w = |g: usize| self.group_dims(g).iter().sum::<usize>() as u128;
        self.tiles
            .iter()
            .map(|t| match *t {
                Tile::Diag(g) => w(g) * (w(g) + 1) / 2,
                Tile::Cross(g, h) => w(g) * w(h),
            })
            .sum()
    }

    fn tile_bytes(&self, t: Tile) -> u128 {
        match t {
            Tile::Diag(g) => pass_bytes(&self.group_dims(g), self.block_rows, self.compute),
            Tile::Cross(g, h) => cross_pass_bytes(
                &self.group_dims(g),
                &self.group_dims(h),
                self.block_rows,
                self.compute,
            ),
        }
    }
}

/// The plan for `n` rows of layers of widths `dims` (`0..num_a` from the first source;
/// `num_a == dims.len()` for one source) whose largest tile fits `budget` bytes; `block_rows`
/// as given, else the default for the tiles' width (at most `n`). [`Error::Memory`] with the smallest budget that
/// would work when even pieces of [`MIN_PIECE_COLUMNS`] columns do not fit.
pub fn plan_tiles(shape: &PassShape<'_>, budget: &Budget) -> Result<TilePlan> {
    let (dims, num_a, block_rows, compute) =
        (shape.dims, shape.num_a, shape.block_rows, shape.compute);
    let d_total: usize = dims.iter().sum();
    // Rows per block and peak of a cross tile of two groups of `w` columns (norms included).
    // Default rows per block: as a single pass over the tile would take them, but with the
    // block buffers (2 × 2w values of 8 bytes per row) within a quarter of the budget down to
    // MIN_TILE_BLOCK_ROWS (the packed products stay efficient from a few hundred rows).
    let cap = budget.bytes as u128;
    let rows_for = |w: usize| {
        block_rows
            .unwrap_or_else(|| {
                let fit = (cap / 4 / (2 * w.max(2) as u128 * 16)).min(usize::MAX as u128) as usize;
                default_block_rows_for(&[w.max(2) - 1; 2], compute)
                    .min(fit.max(MIN_TILE_BLOCK_ROWS))
            })
            .min(shape.max_block_rows())
    };
    // (A group of w columns is at most w − 1 feature columns and one norm; its diagonal tile
    // is never larger than a cross tile of two such groups.)
    let bound = |w: usize| {
        let side = [w.max(2) - 1];
        cross_pass_bytes(&side, &side, rows_for(w), compute).max(pass_bytes(
            &side,
            rows_for(w),
            compute,
        ))
    };
    let w_min = dims
        .iter()
        .map(|&d| d.min(MIN_PIECE_COLUMNS))
        .max()
        .unwrap_or(1)
        + 1;
    let (mut lo, mut hi) = (w_min, d_total + dims.len());
    if bound(lo) > cap {
        return budget
            .check(
                bound(lo),
                format_args!(
                    "a tiled pass over {} layers (D = {d_total}) in pieces of {} columns",
                    dims.len(),
                    w_min - 1
                ),
                format!(
                    "a budget of at least {} is needed for any exact plan",
                    fmt_bytes(bound(lo))
                ),
            )
            .and(Err(Error::Memory("the memory budget is too small".into())));
    }
    // The widest group whose tiles fit (the bound grows with w).
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if bound(mid) <= cap {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let w = lo;
    let br = rows_for(w);
    // Pieces: whole layers, or near-equal column blocks of at most w − 1 columns.
    let mut pieces = Vec::new();
    for (l, &d) in dims.iter().enumerate() {
        let k = d.div_ceil(w - 1);
        for i in 0..k {
            pieces.push(Piece {
                layer: l,
                cols: (i * d / k)..((i + 1) * d / k),
            });
        }
    }
    // Groups: pieces in order, each group within w (columns + norms), never mixing sources.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut width = 0;
    for (i, p) in pieces.iter().enumerate() {
        let pw = p.cols.len() + 1;
        let starts_b = p.layer == num_a && p.cols.start == 0;
        match groups.last_mut() {
            Some(g) if width + pw <= w && !starts_b => {
                g.push(i);
                width += pw;
            }
            _ => {
                groups.push(vec![i]);
                width = pw;
            }
        }
    }
    let side_b = |g: &Vec<usize>| pieces[g[0]].layer >= num_a;
    let shares_layer = |g: &Vec<usize>, h: &Vec<usize>| {
        g.iter()
            .any(|&p| h.iter().any(|&q| pieces[p].layer == pieces[q].layer))
    };
    let mut tiles = Vec::new();
    for (gi, g) in groups.iter().enumerate() {
        tiles.push(Tile::Diag(gi));
        for (hi, h) in groups.iter().enumerate().skip(gi + 1) {
            let one_source = num_a == dims.len();
            if one_source || side_b(g) != side_b(h) || shares_layer(g, h) {
                tiles.push(Tile::Cross(gi, hi));
            }
        }
    }
    let mut plan = TilePlan {
        dims: dims.to_vec(),
        num_a,
        pieces,
        groups,
        tiles,
        block_rows: br,
        compute,
        peak_bytes: 0,
    };
    plan.peak_bytes = plan
        .tiles
        .iter()
        .map(|&t| plan.tile_bytes(t))
        .max()
        .unwrap_or(0);
    Ok(plan)
}

/// Progress of one pass of several, reported as one bar over all of them (units: rows ×
/// passes).
struct PassMonitor<'a> {
    inner: &'a dyn Monitor,
    pass: u64,
    passes: u64,
}

impl Monitor for PassMonitor<'_> {
    fn progress(&self, done: u64, total: u64) -> Result<()> {
        self.inner
            .progress(self.pass * total + done, self.passes * total)
    }
}

/// Run `plan` over `src` (the layers of `plan.dims`, named `names`): every tile one pass
/// through the one block reader, each tile's accumulator dropped before the next is made.
/// Returns the [`PairStats`] of the pairs the plan covers (every pair within one source;
/// across two, every first-source layer with every second-source layer, and each layer with
/// itself).
pub fn run_tiled(
    src: &dyn RowSource,
    names: &[String],
    plan: &TilePlan,
    check_finite: bool,
    budget: &Budget,
    monitor: &dyn Monitor,
) -> Result<PairStats> {
    if src.dims() != plan.dims || names.len() != plan.dims.len() {
        return Err(Error::Mismatch(format!(
            "the plan is for layers of widths {:?}, the source has {:?} ({} names)",
            plan.dims,
            src.dims(),
            names.len()
        )));
    }
    let n = src.num_rows();
    let mut out = PairStatsBuilder::new(plan, names, n)?;
    let passes = plan.tiles.len() as u64;
    for t in 0..plan.tiles.len() {
        let mon = PassMonitor {
            inner: monitor,
            pass: t as u64,
            passes,
        };
        let shift = plan.tile_shift(src, t)?;
        let part = plan.run_tile(
            src,
            names,
            t,
            0..n,
            shift.as_deref(),
            check_finite,
            budget,
            &mon,
        )?;
        out.add(t, part)?;
    }
    out.finish()
}

/// How an exact all-pairs linear pass runs: one pass over all layers at once, or tiles.
#[derive(Clone, Debug)]
pub enum PairPlan {
    /// One [`super::MomentAccumulator`] over every layer ([`pass_bytes`]): as a tile plan, one
    /// diagonal tile of whole layers ([`TilePlan::single`]).
    Single(TilePlan),
    Tiled(TilePlan),
    /// Per-layer centred `n × n` Grams ([`GramPlan`]).
    Gram(GramPlan),
}

/// The strategies [`PairPlan::choose`] knows.
pub const PAIR_STRATEGIES: [&str; 3] = ["single-pass", "tiled", "gram"];

/// Nominal rates of the cost model that ranks plans (slice of the planner that does not need
/// to be exact: it only compares plans of the same call): multiply-adds per second of the
/// packed products, and values read (and converted) per second.
const NOMINAL_MADDS_PER_S: f64 = 5e10;
const NOMINAL_VALUES_PER_S: f64 = 1e9;

impl PairPlan {
    /// The plan for an exact pass over `n` rows of layers of widths `dims` (`0..num_a` from
    /// the first source). `strategy` `None` picks, among the plans that fit `budget`, the one
    /// with the least estimated time ([`PairPlan::cost_seconds`]): the single pass when it
    /// fits (else tiles), or the Gram route; `"single-pass"`, `"tiled"` or `"gram"` force one
    /// (a [`Error::Memory`] when it does not fit, with the minimum it needs; an unknown name
    /// is an [`Error::InvalidArgument`] listing them).
    pub fn choose(
        shape: &PassShape<'_>,
        budget: &Budget,
        strategy: Option<&str>,
    ) -> Result<PairPlan> {
        let (dims, num_a, n, block_rows) = (shape.dims, shape.num_a, shape.n, shape.block_rows);
        let compute = shape.compute;
        if n == 0 {
            return Err(Error::invalid(
                "no rows were accumulated (the source has no rows)",
            ));
        }
        let nmax = shape.max_block_rows();
        let single = |check: bool| -> Result<PairPlan> {
            let br = block_rows
                .unwrap_or_else(|| default_block_rows_for(dims, compute))
                .min(nmax);
            if check {
                super::plan::check_memory(dims, br, compute, budget)?;
            }
            Ok(PairPlan::Single(TilePlan::single(dims, num_a, br, compute)))
        };
        let tiled = || plan_tiles(shape, budget).map(PairPlan::Tiled);
        let gram = || GramPlan::new(shape, budget).map(PairPlan::Gram);
        match strategy {
            None => {
                let s = single(false)?;
                let moments = if s.peak_bytes() <= budget.bytes as u128 {
                    Ok(s)
                } else {
                    tiled()
                };
                match (moments, gram()) {
                    (Ok(m), Ok(g)) => Ok(if g.cost_seconds(n) < m.cost_seconds(n) {
                        g
                    } else {
                        m
                    }),
                    (Ok(m), Err(_)) => Ok(m),
                    (Err(_), Ok(g)) => Ok(g),
                    (Err(e), Err(_)) => Err(e),
                }
            }
            Some("single-pass") => single(true),
            Some("tiled") => tiled(),
            Some("gram") => gram(),
            Some(other) => Err(Error::invalid(format!(
                "strategy must be one of {PAIR_STRATEGIES:?} (or None: the cheapest that \
                 fits), got {other:?}"
            ))),
        }
    }

    /// The plan as tiles over pieces (a single pass: one diagonal tile of whole layers), the
    /// form a distributed run cuts into tasks; `None` for the Gram route (it needs every row
    /// of a layer at once).
    pub fn tile_plan(&self) -> Option<TilePlan> {
        match self {
            PairPlan::Single(t) | PairPlan::Tiled(t) => Some(t.clone()),
            PairPlan::Gram(_) => None,
        }
    }

    /// Estimated seconds at nominal rates (multiply-adds and values read): ranks the plans of
    /// one call.
    pub fn cost_seconds(&self, n: u64) -> f64 {
        let values: f64 = self
            .layer_reads()
            .iter()
            .zip(self.dims())
            .map(|(&r, &d)| r as f64 * d as f64 * n as f64)
            .sum();
        self.madds(n) as f64 / NOMINAL_MADDS_PER_S + values / NOMINAL_VALUES_PER_S
    }

    pub fn dims(&self) -> &[usize] {
        match self {
            PairPlan::Single(t) | PairPlan::Tiled(t) => &t.dims,
            PairPlan::Gram(g) => &g.dims,
        }
    }

    /// Multiply-adds of the whole plan over `n` rows.
    pub fn madds(&self, n: u64) -> u128 {
        match self {
            PairPlan::Gram(g) => g.madds(),
            _ => self.madds_per_row() * n as u128,
        }
    }

    pub fn strategy(&self) -> &'static str {
        match self {
            PairPlan::Single(_) => "single-pass",
            PairPlan::Tiled(_) => "tiled",
            PairPlan::Gram(_) => "gram",
        }
    }

    pub fn passes(&self) -> usize {
        match self {
            PairPlan::Single(t) | PairPlan::Tiled(t) => t.passes(),
            PairPlan::Gram(g) => g.rounds.len(),
        }
    }

    pub fn peak_bytes(&self) -> u128 {
        match self {
            PairPlan::Single(t) | PairPlan::Tiled(t) => t.peak_bytes,
            PairPlan::Gram(g) => g.peak_bytes,
        }
    }

    pub fn block_rows(&self) -> usize {
        match self {
            PairPlan::Single(t) | PairPlan::Tiled(t) => t.block_rows,
            PairPlan::Gram(g) => g.n,
        }
    }

    /// How many passes read each layer.
    pub fn layer_reads(&self) -> Vec<u64> {
        match self {
            PairPlan::Single(t) | PairPlan::Tiled(t) => t.layer_reads(),
            PairPlan::Gram(g) => g.layer_reads(),
        }
    }

    /// Multiply-adds per row of the packed products (the Gram route: its total over `n`,
    /// rounded up).
    pub fn madds_per_row(&self) -> u128 {
        match self {
            PairPlan::Gram(g) => g.madds().div_ceil(g.n.max(1) as u128),
            PairPlan::Single(t) | PairPlan::Tiled(t) => t.madds_per_row(),
        }
    }

    /// Run the plan over `src`: the [`PairStats`] of every pair within one source, or of
    /// every first-source layer with every second-source one (and each layer with itself).
    pub fn run(
        &self,
        src: &dyn RowSource,
        names: &[String],
        check_finite: bool,
        budget: &Budget,
        monitor: &dyn Monitor,
    ) -> Result<PairStats> {
        match self {
            PairPlan::Single(t) => {
                let (br, compute) = (Some(t.block_rows), t.compute);
                let m = accumulate(src, names, br, check_finite, budget, compute, monitor)?
                    .finalize()?;
                let (rows, cols) = pair_sides(t.num_a, t.dims.len());
                PairStats::from_moments(&m, &rows, &cols)
            }
            PairPlan::Tiled(t) => run_tiled(src, names, t, check_finite, budget, monitor),
            PairPlan::Gram(g) => g.run(src, names, check_finite, monitor),
        }
    }
}
