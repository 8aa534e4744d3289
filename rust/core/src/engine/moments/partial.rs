//! One tile of a pair plan over one range of rows: the unit of distributed work.
//!
//! A [`TilePlan`] (a single pass is the plan of one diagonal tile, [`TilePlan::single`]) is
//! cut into tasks `(tile, rows [start, stop))`. Each task streams its rows through the one
//! block reader into the tile's accumulator ([`TilePlan::run_tile`]) under the tile's
//! reference shift, sampled once over **all** rows ([`TilePlan::tile_shift`]), and returns a
//! [`TilePartial`] — serialisable ([`TilePartial::to_bytes`]) and mergeable
//! ([`TilePartial::merge`]: the sums of adjacent row ranges add; the merged value is the one
//! a single pass over both ranges gives, to rounding). A [`PairStatsBuilder`] takes each
//! tile's merged partial, finalises it and adds what linear CKA needs of its pairs; the local
//! tiled pass ([`super::run_tiled`]) is the same steps with one task per tile.
//!
//! Merge order: a merge puts `other`'s rows after this one's (first non-finite rows are
//! offset by this one's row count), so partials are merged as adjacent ranges, left with
//! right — any tree of such merges gives the same sums up to rounding.
use super::accumulator::MomentAccumulator;
use super::codec::{is_cross, merge_serialised};
use super::cross::CrossAccumulator;
use super::pairs::PairStats;
use super::pass::{accumulate_into, sample_scale, sample_shift};
use super::plan::{check_memory, cross_pass_bytes, pass_bytes};
use super::state::Compute;
use super::tiled::{Piece, Tile, TilePlan};
use crate::error::{Error, Result};
use crate::memory::{fmt_bytes, Budget};
use crate::monitor::Monitor;
use crate::store::stream::{self, RowSource};
use crate::store::{Columns, RowRange};
use rayon::prelude::*;
use std::ops::Range;

/// A tile's sums over some rows: a diagonal tile's [`MomentAccumulator`] or a cross tile's
/// [`CrossAccumulator`].
pub enum TilePartial {
    Diag(MomentAccumulator),
    Cross(CrossAccumulator),
}

impl TilePartial {
    /// Rows accumulated.
    pub fn n(&self) -> u64 {
        match self {
            TilePartial::Diag(a) => a.n(),
            TilePartial::Cross(a) => a.n(),
        }
    }

    /// Add `other`'s rows (the next range of the same tile).
    pub fn merge(&mut self, other: &TilePartial) -> Result<()> {
        match (self, other) {
            (TilePartial::Diag(a), TilePartial::Diag(b)) => a.merge(b),
            (TilePartial::Cross(a), TilePartial::Cross(b)) => a.merge(b),
            _ => Err(Error::Mismatch(
                "cannot merge a diagonal tile's sums with a cross tile's".into(),
            )),
        }
    }

    /// The accumulator's own serialisation (each starts with its own magic bytes).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        match self {
            TilePartial::Diag(a) => a.to_bytes(),
            TilePartial::Cross(a) => a.to_bytes(),
        }
    }

    /// Inverse of [`to_bytes`](Self::to_bytes); any inconsistency is an [`Error::Format`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if is_cross(bytes) {
            CrossAccumulator::from_bytes(bytes).map(TilePartial::Cross)
        } else {
            MomentAccumulator::from_bytes(bytes).map(TilePartial::Diag)
        }
    }
}

/// The serialised partial sums of `a` followed by `b`'s rows (the next range of the same
/// tile), serialised: added straight from the bytes when both were accumulated under one
/// shift (every task of a distributed tile), else decoded, merged exactly and encoded.
pub fn merge_partial_bytes(a: &[u8], b: &[u8]) -> Result<Vec<u8>> {
    if let Some(out) = merge_serialised(a, b)? {
        return Ok(out);
    }
    let mut x = TilePartial::from_bytes(a)?;
    x.merge(&TilePartial::from_bytes(b)?)?;
    x.to_bytes()
}

impl TilePlan {
    /// The plan of one pass over every layer at once: one group of whole layers, one
    /// diagonal tile (`block_rows` rows per block).
    pub fn single(dims: &[usize], num_a: usize, block_rows: usize, compute: Compute) -> Self {
        TilePlan {
            dims: dims.to_vec(),
            num_a,
            pieces: dims
                .iter()
                .enumerate()
                .map(|(layer, &d)| Piece { layer, cols: 0..d })
                .collect(),
            groups: vec![(0..dims.len()).collect()],
            tiles: vec![Tile::Diag(0)],
            block_rows,
            compute,
            peak_bytes: pass_bytes(dims, block_rows, compute),
        }
    }

    /// Checks a plan read from elsewhere (JSON from another process): every piece a
    /// non-empty column range of a layer, every group non-empty and of known pieces, every
    /// tile of known groups, `block_rows` positive.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(format!("invalid tile plan: {m}")));
        if self.dims.is_empty() || self.dims.contains(&0) {
            return bad(format!("layer widths {:?}", self.dims));
        }
        if self.num_a == 0 || self.num_a > self.dims.len() || self.block_rows == 0 {
            return bad(format!(
                "num_a {} of {} layers, block_rows {}",
                self.num_a,
                self.dims.len(),
                self.block_rows
            ));
        }
        for p in &self.pieces {
            let d = self.dims.get(p.layer).copied().unwrap_or(0);
            if p.cols.start >= p.cols.end || p.cols.end > d {
                return bad(format!("piece {:?} of a layer of width {d}", p));
            }
        }
        for g in &self.groups {
            if g.is_empty() || g.iter().any(|&p| p >= self.pieces.len()) {
                return bad(format!("group {g:?} ({} pieces)", self.pieces.len()));
            }
        }
        let ng = self.groups.len();
        for t in &self.tiles {
            let ok = match *t {
                Tile::Diag(g) => g < ng,
                Tile::Cross(g, h) => g < ng && h < ng && g != h,
            };
            if !ok {
                return bad(format!("tile {t:?} ({ng} groups)"));
            }
        }
        if self.tiles.is_empty() {
            return bad("no tiles".into());
        }
        Ok(())
    }

    /// The pieces a tile reads, in accumulator order (cross tiles: side A's group, then B's).
    pub fn tile_pieces(&self, t: usize) -> Result<Vec<usize>> {
        Ok(match self.tile(t)? {
            Tile::Diag(g) => self.groups[g].clone(),
            Tile::Cross(g, h) => self.groups[g]
                .iter()
                .chain(&self.groups[h])
                .copied()
                .collect(),
        })
    }

    /// The layers a tile reads (sorted, each once).
    pub fn tile_layers(&self, t: usize) -> Result<Vec<usize>> {
        let mut ls: Vec<usize> = self
            .tile_pieces(t)?
            .iter()
            .map(|&p| self.pieces[p].layer)
            .collect();
        ls.sort_unstable();
        ls.dedup();
        Ok(ls)
    }

    /// Peak bytes of one task of tile `t` ([`pass_bytes`] or [`cross_pass_bytes`]).
    pub fn tile_peak_bytes(&self, t: usize) -> Result<u128> {
        let dims = self.piece_dims(t)?;
        Ok(match self.tile(t)? {
            Tile::Diag(_) => pass_bytes(&dims, self.block_rows, self.compute),
            Tile::Cross(g, _) => {
                let na = self.groups[g].len();
                cross_pass_bytes(&dims[..na], &dims[na..], self.block_rows, self.compute)
            }
        })
    }

    fn tile(&self, t: usize) -> Result<Tile> {
        self.tiles.get(t).copied().ok_or_else(|| {
            Error::invalid(format!(
                "tile {t} out of range ({} tiles)",
                self.tiles.len()
            ))
        })
    }

    fn piece_dims(&self, t: usize) -> Result<Vec<usize>> {
        Ok(self
            .tile_pieces(t)?
            .iter()
            .map(|&p| self.pieces[p].cols.len())
            .collect())
    }

    /// Names of the pieces of tile `t` (a whole layer's name, else `name[c0:c1]`).
    pub(super) fn piece_names(&self, names: &[String], t: usize) -> Result<Vec<String>> {
        self.tile_pieces(t)?
            .iter()
            .map(|&p| {
                let pc = &self.pieces[p];
                let name = names.get(pc.layer).ok_or_else(|| {
                    Error::invalid(format!(
                        "{} names for {} layers",
                        names.len(),
                        self.dims.len()
                    ))
                })?;
                Ok(if pc.cols.len() == self.dims[pc.layer] {
                    name.clone()
                } else {
                    format!("{name}[{}:{}]", pc.cols.start, pc.cols.end)
                })
            })
            .collect()
    }

    /// Tile `t`'s columns of `src` (the plan's layers) as a source of its own.
    fn columns<'a>(&self, src: &'a dyn RowSource, t: usize) -> Result<Columns<'a>> {
        if src.dims() != self.dims {
            return Err(Error::Mismatch(format!(
                "the plan is for layers of widths {:?}, the source has {:?}",
                self.dims,
                src.dims()
            )));
        }
        let pieces = self
            .tile_pieces(t)?
            .iter()
            .map(|&p| (self.pieces[p].layer, self.pieces[p].cols.clone()))
            .collect();
        Columns::new(src, pieces)
    }

    /// Tile `t`'s reference shift: the column means of rows spread over **all** of `src`
    /// ([`sample_shift`]); `None` when a sampled value is not finite.
    pub fn tile_shift(&self, src: &dyn RowSource, t: usize) -> Result<Option<Vec<f64>>> {
        sample_shift(&self.columns(src, t)?)
    }

    /// Tile `t`'s scale exponents, one per piece ([`sample_scale`] of its layer: one unit
    /// per source layer on every tile and task, so that its pieces' statistics add up).
    pub fn tile_scale(&self, src: &dyn RowSource, t: usize) -> Result<Vec<i32>> {
        let layers = self.tile_layers(t)?;
        let layer_exps = sample_scale(src, &layers)?;
        Ok(self
            .tile_pieces(t)?
            .iter()
            .map(|&p| {
                let l = self.pieces[p].layer;
                layers
                    .iter()
                    .position(|&x| x == l)
                    .map_or(0, |i| layer_exps[i])
            })
            .collect())
    }

    /// One task: rows `rows` of tile `t` of `src` (the plan's layers, named `names`) under
    /// `shift` ([`TilePlan::tile_shift`]; `None`: the first block's means, which merges
    /// exactly only for diagonal tiles). [`Error::Memory`] before reading a row when the
    /// task's peak ([`TilePlan::tile_peak_bytes`]) exceeds `budget`.
    #[allow(clippy::too_many_arguments)]
    pub fn run_tile(
        &self,
        src: &dyn RowSource,
        names: &[String],
        t: usize,
        rows: Range<u64>,
        shift: Option<&[f64]>,
        check_finite: bool,
        budget: &Budget,
        monitor: &dyn Monitor,
    ) -> Result<TilePartial> {
        let cols = self.columns(src, t)?;
        let range = RowRange::new(&cols, rows.clone())?;
        let pnames = self.piece_names(names, t)?;
        let dims = cols.dims();
        let exps = self.tile_scale(src, t)?;
        match self.tile(t)? {
            Tile::Diag(_) => {
                check_memory(&dims, self.block_rows, self.compute, budget)?;
                let mut acc = MomentAccumulator::new(&dims)?
                    .with_names(&pnames)?
                    .with_check_finite(check_finite)
                    .with_compute(self.compute)
                    .with_row_base(rows.start);
                acc.set_scale(&exps)?;
                accumulate_into(acc, &range, self.block_rows, shift, monitor).map(TilePartial::Diag)
            }
            Tile::Cross(g, _) => {
                let na = self.groups[g].len();
                let need = self.tile_peak_bytes(t)?;
                budget.check(
                    need,
                    format_args!(
                        "a cross tile of {} × {} columns ({})",
                        dims[..na].iter().sum::<usize>(),
                        dims[na..].iter().sum::<usize>(),
                        fmt_bytes(need)
                    ),
                    "plan the pass under this budget (max_memory) so that its tiles fit",
                )?;
                let mut acc = CrossAccumulator::new(&dims[..na], &dims[na..])?
                    .with_names(&pnames)?
                    .with_check_finite(check_finite)
                    .with_compute(self.compute)
                    .with_row_base(rows.start);
                if let Some(shift) = shift {
                    acc.set_shift(shift)?;
                }
                acc.set_scale(&exps)?;
                if range.has_f64() {
                    stream::run::<f64>(&range, self.block_rows, monitor, |b, r| acc.update(b, r))?;
                } else {
                    stream::run::<f32>(&range, self.block_rows, monitor, |b, r| acc.update(b, r))?;
                }
                Ok(TilePartial::Cross(acc))
            }
        }
    }
}

/// [`PairStats`] assembled from each tile's merged partial (in any order of tiles).
pub struct PairStatsBuilder {
    plan: TilePlan,
    st: PairStats,
    count: Vec<u64>,
    added: Vec<bool>,
}

impl PairStatsBuilder {
    /// For `n` rows of the plan's layers, named `names`.
    pub fn new(plan: &TilePlan, names: &[String], n: u64) -> Result<Self> {
        plan.validate()?;
        let l = plan.dims.len();
        if names.len() != l {
            return Err(Error::Mismatch(format!(
                "{} names for {l} layers",
                names.len()
            )));
        }
        Ok(PairStatsBuilder {
            st: PairStats {
                n,
                dims: plan.dims.clone(),
                names: names.to_vec(),
                sq: vec![0.0; l * l],
                rr: vec![0.0; l * l],
                trace: vec![0.0; l],
                known: vec![false; l * l],
                nonfinite: vec![None; l],
                shift_offset: 0.0,
            },
            count: vec![0; l * l],
            added: vec![false; plan.tiles.len()],
            plan: plan.clone(),
        })
    }

    /// Tiles not added yet.
    pub fn missing(&self) -> Vec<usize> {
        (0..self.added.len()).filter(|&t| !self.added[t]).collect()
    }

    /// Adds tile `t`'s sums over all `n` rows: every pair of its pieces.
    pub fn add(&mut self, t: usize, partial: TilePartial) -> Result<()> {
        let members = self.plan.tile_pieces(t)?;
        if self.added[t] {
            return Err(Error::invalid(format!("tile {t} was already added")));
        }
        if partial.n() != self.st.n {
            return Err(Error::Mismatch(format!(
                "tile {t} holds {} rows, the pass has {}",
                partial.n(),
                self.st.n
            )));
        }
        let dims = self.plan.piece_dims(t)?;
        let l = self.plan.dims.len();
        let layer = |p: usize| self.plan.pieces[p].layer;
        let mut adds: Vec<(usize, usize, f64, f64)> = Vec::new();
        match (self.plan.tile(t)?, partial) {
            (Tile::Diag(_), TilePartial::Diag(acc)) => {
                if acc.dims() != dims.as_slice() {
                    return Err(Error::Mismatch(format!(
                        "tile {t} has pieces of widths {dims:?}, its sums {:?}",
                        acc.dims()
                    )));
                }
                let m = acc.finalize()?;
                self.st.shift_offset = self.st.shift_offset.max(m.shift_offset);
                let pairs: Vec<(usize, usize)> = (0..members.len())
                    .flat_map(|a| (a..members.len()).map(move |b| (a, b)))
                    .collect();
                let vals: Vec<(f64, f64)> = pairs
                    .par_iter()
                    .map(|&(a, b)| Ok((m.block_sq_norm(a, b)?, m.rr(a, b)?)))
                    .collect::<Result<_>>()?;
                for (a, &p) in members.iter().enumerate() {
                    self.st.trace[layer(p)] += m.trace(a)?;
                    if let Some(r) = m.nonfinite[a] {
                        let x = &mut self.st.nonfinite[layer(p)];
                        *x = Some(x.map_or(r, |o| o.min(r)));
                    }
                }
                for (&(a, b), (sq, rr)) in pairs.iter().zip(vals) {
                    adds.push((members[a], members[b], sq, rr));
                }
            }
            (Tile::Cross(g, _), TilePartial::Cross(acc)) => {
                let na = self.plan.groups[g].len();
                let cs = acc.finalize()?;
                let nb = members.len() - na;
                if cs.sq.len() != na * nb {
                    return Err(Error::Mismatch(format!(
                        "tile {t} has {na} × {nb} piece pairs, its sums {}",
                        cs.sq.len()
                    )));
                }
                for a in 0..na {
                    for b in 0..nb {
                        let k = a * nb + b;
                        adds.push((members[a], members[na + b], cs.sq[k], cs.rr[k]));
                    }
                }
            }
            _ => {
                return Err(Error::Mismatch(format!(
                    "tile {t}'s sums are of the other kind (diagonal / cross)"
                )))
            }
        }
        // Each unordered pair of pieces: both orders of their layers, once when p = q.
        for (p, q, sq, rr) in adds {
            let (x, y) = (layer(p), layer(q));
            self.st.sq[x * l + y] += sq;
            self.st.rr[x * l + y] += rr;
            self.count[x * l + y] += 1;
            if p != q {
                self.st.sq[y * l + x] += sq;
                self.st.rr[y * l + x] += rr;
                self.count[y * l + x] += 1;
            }
        }
        self.added[t] = true;
        Ok(())
    }

    /// The statistics, once every tile is added (a pair is known when every pair of its
    /// layers' pieces was in some tile).
    pub fn finish(mut self) -> Result<PairStats> {
        let missing = self.missing();
        if !missing.is_empty() {
            return Err(Error::invalid(format!(
                "tiles {missing:?} of {} were not added",
                self.added.len()
            )));
        }
        let l = self.plan.dims.len();
        let per_layer: Vec<u64> = (0..l)
            .map(|x| self.plan.pieces.iter().filter(|p| p.layer == x).count() as u64)
            .collect();
        for x in 0..l {
            for y in 0..l {
                self.st.known[x * l + y] = self.count[x * l + y] == per_layer[x] * per_layer[y];
            }
        }
        Ok(self.st)
    }
}
