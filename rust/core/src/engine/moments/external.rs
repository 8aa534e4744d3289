//! Sums computed elsewhere — the torch engine's products on a device
//! (`python/layerscope/_device.py`) — made into the core's own accumulators: a tile's
//! [`TilePartial`] that serialises, merges with the CPU engine's and Ray's partials of the same
//! tile, and finalises through the same code ([`PairStatsBuilder`](super::PairStatsBuilder),
//! [`MomentAccumulator::finalize`]). Only the block products move; what they mean, and every
//! formula that follows from them, stays here.
//!
//! What the other engine computes for tile `t` of a [`TilePlan`] over `n` rows, with the
//! tile's pieces in [`TilePlan::tile_pieces`] order, the shift `μ0` of
//! [`TilePlan::tile_shift`] and the exponents of [`TilePlan::tile_scale`]:
//! `u = (x − μ0) · 2^-e` per piece and `r_p = ‖u_p‖²`, `w = [u, r]` (`D + L` columns, all
//! `u` columns first). Then
//! * a diagonal tile: `products = Σ_a w_a w_aᵀ` (row-major `(D+L) × (D+L)`, only the upper
//!   triangle is read);
//! * a cross tile (pieces `0..na` side A): `products = Σ_a w_{A,a} w_{B,a}ᵀ` (row-major
//!   `(D_A + L_A) × (D_B + L_B)`, `w_A = [u_A, r_A]`);
//!
//! and in both `sums = Σ_a w_a` (`[u, r]` order). The arithmetic rules are the core's
//! ([`super::Compute`]); these functions only check shapes and move numbers.
use super::accumulator::MomentAccumulator;
use super::cross::CrossAccumulator;
use super::partial::TilePartial;
use super::state::{checked_names, checked_shift, offsets_of};
use super::tiled::{Tile, TilePlan};
use crate::error::{Error, Result};

/// What another engine accumulated for one tile (see the module docs).
#[derive(Clone, Debug)]
pub struct ExternalSums<'a> {
    /// Rows accumulated.
    pub n: u64,
    /// The reference shift the products were computed under (`D` values).
    pub shift: &'a [f64],
    /// Per piece, the scale exponent `e` the shifted values were multiplied by `2^-e` with.
    pub exps: &'a [i32],
    /// The products (row-major, see the module docs).
    pub products: &'a [f64],
    /// `Σ_a w_a` (`D + L` values).
    pub sums: &'a [f64],
    /// Per piece, the first row (relative to the first row accumulated) holding a NaN/Inf.
    pub nonfinite: &'a [Option<u64>],
    /// Whether NaN/Inf were refused (recorded in the serialised form).
    pub check_finite: bool,
}

fn expect_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::Mismatch(format!(
            "{what}: {got} values, the tile needs {want}"
        )));
    }
    Ok(())
}

impl ExternalSums<'_> {
    fn check(&self, pieces: usize, d: usize) -> Result<()> {
        expect_len("the scale exponents", self.exps.len(), pieces)?;
        expect_len("the first non-finite rows", self.nonfinite.len(), pieces)?;
        expect_len("the column sums", self.sums.len(), d + pieces)?;
        if self.exps.iter().any(|e| e.abs() > 1000) {
            return Err(Error::invalid(format!(
                "scale exponents must lie within ±1000, got {:?}",
                self.exps
            )));
        }
        if self.n > 0 {
            checked_shift(self.shift, d, false)?;
        }
        Ok(())
    }
}

impl MomentAccumulator {
    /// The accumulator of layers (or pieces) of widths `dims` named `names` holding `x`'s
    /// sums (a diagonal tile's; `x.products` row-major `(D+L)²`, upper triangle read).
    pub fn from_sums(dims: &[usize], names: &[String], x: &ExternalSums) -> Result<Self> {
        let mut acc = MomentAccumulator::new(dims)?
            .with_names(names)?
            .with_check_finite(x.check_finite);
        let (d, dz) = (acc.d(), acc.dz());
        x.check(dims.len(), d)?;
        expect_len("the products", x.products.len(), dz * dz)?;
        if x.n > 0 {
            acc.set_shift(x.shift)?;
            acc.set_scale(x.exps)?;
        }
        // row-major (i, j), i ≤ j → the column-major upper triangle's cell i + j·dz
        for j in 0..dz {
            for i in 0..=j {
                acc.s[i + j * dz] = x.products[i * dz + j];
            }
        }
        acc.sums.copy_from_slice(x.sums);
        acc.st.n = x.n;
        acc.st.nonfinite = x.nonfinite.to_vec();
        Ok(acc)
    }
}

impl CrossAccumulator {
    /// The cross tile of sides of widths `a` and `b` (pieces named `names`, A then B)
    /// holding `x`'s sums (`x.products` row-major `(D_A + L_A) × (D_B + L_B)`).
    pub fn from_sums(a: &[usize], b: &[usize], names: &[String], x: &ExternalSums) -> Result<Self> {
        let mut acc = CrossAccumulator::new(a, b)?
            .with_names(names)?
            .with_check_finite(x.check_finite);
        let (da, db) = (a.iter().sum::<usize>(), b.iter().sum::<usize>());
        let (la, lb) = (a.len(), b.len());
        x.check(la + lb, da + db)?;
        let cols = db + lb;
        expect_len("the products", x.products.len(), (da + la) * cols)?;
        if x.n > 0 {
            acc.set_shift(x.shift)?;
            acc.set_scale(x.exps)?;
        }
        let p = |i: usize, j: usize| x.products[i * cols + j];
        for j in 0..db {
            for i in 0..da {
                acc.uu[i + j * da] = p(i, j); // column-major D_A × D_B
            }
        }
        for l in 0..lb {
            for i in 0..da {
                acc.ur[i + l * da] = p(i, db + l); // column-major D_A × L_B
            }
        }
        for k in 0..la {
            for j in 0..db {
                acc.ru[k * db + j] = p(da + k, j); // row-major L_A × D_B
            }
            for l in 0..lb {
                acc.rr[k * lb + l] = p(da + k, db + l);
            }
        }
        let d = da + db;
        acc.su.copy_from_slice(&x.sums[..d]);
        acc.sr.copy_from_slice(&x.sums[d..]);
        acc.st.n = x.n;
        acc.st.nonfinite = x.nonfinite.to_vec();
        Ok(acc)
    }
}

/// What another engine needs to know of tile `t` to compute its sums: every piece as
/// `(layer, columns)` in accumulator order, and `Some(na)` for a cross tile (pieces `0..na`
/// are side A), `None` for a diagonal one.
pub type TileLayout = (Vec<(usize, std::ops::Range<usize>)>, Option<usize>);

impl TilePlan {
    /// The names of tile `t`'s pieces (a whole layer's name, else `name[c0:c1]`), as the
    /// core names them in its errors, for the plan's layers `names`.
    pub fn tile_piece_names(&self, names: &[String], t: usize) -> Result<Vec<String>> {
        self.piece_names(names, t)
    }

    /// The pieces of tile `t` and its kind (see [`TileLayout`]).
    pub fn tile_layout(&self, t: usize) -> Result<TileLayout> {
        let pieces = self
            .tile_pieces(t)?
            .iter()
            .map(|&p| (self.pieces[p].layer, self.pieces[p].cols.clone()))
            .collect();
        let kind = match self.tiles[t] {
            Tile::Diag(_) => None,
            Tile::Cross(g, _) => Some(self.groups[g].len()),
        };
        Ok((pieces, kind))
    }

    /// Tile `t`'s partial made of sums computed elsewhere (`names`: the plan's layers).
    pub fn partial_from_sums(
        &self,
        names: &[String],
        t: usize,
        x: &ExternalSums,
    ) -> Result<TilePartial> {
        let (pieces, kind) = self.tile_layout(t)?;
        let pnames = self.piece_names(names, t)?;
        let pnames = checked_names(&pnames, pieces.len())?;
        let dims: Vec<usize> = pieces.iter().map(|(_, c)| c.len()).collect();
        debug_assert_eq!(offsets_of(&dims).len(), dims.len() + 1);
        Ok(match kind {
            None => TilePartial::Diag(MomentAccumulator::from_sums(&dims, &pnames, x)?),
            Some(na) => TilePartial::Cross(CrossAccumulator::from_sums(
                &dims[..na],
                &dims[na..],
                &pnames,
                x,
            )?),
        })
    }
}
