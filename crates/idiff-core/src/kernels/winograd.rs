//! 3×3 convolutions with stride 1 and padding 1 by Winograd's minimal filtering
//! F(2×2, 3×3): every 2×2 block of outputs (a *tile*) costs 16 multiply–adds per input
//! channel instead of 36.
//!
//! With `d` the 4×4 input patch of a tile and `g` a 3×3 kernel, the tile is
//! `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`. The kernel transform `U = G g Gᵀ` is computed once per
//! (output, input) channel pair and packed as 16 `c_out × c_in` matrices. For a block of
//! tiles the input transform `V = Bᵀ d B` gives 16 `c_in × tiles` matrices, the 16 products
//! `M = U · V` run on the packed GEMM, and the output transform `Aᵀ M A` (plus the bias)
//! writes the tiles. Both data transforms are additions and subtractions in one fixed order,
//! and every GEMM value is one ascending chain, so the result is the same on every
//! instruction set, for any thread count, and for an image alone or in any batch.

use super::gemm::{gemm, Output, PackedA, PackedLayout, Prepacked};
use super::math::dispatch;
use rayon::prelude::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;

/// Values of a transformed tile (4 × 4).
const XI: usize = 16;

/// Tiles per block that the transforms and products work on at once (about; blocks hold
/// whole rows of tiles).
const BLOCK_TILES: usize = 256;

/// Fewest tiles per image for which the transforms pay off against the direct convolution
/// (measured on an AVX-512 CPU).
pub(crate) const MIN_IMAGE_TILES: usize = 16;

/// The same when the weights are transformed for one call only (training).
pub(crate) const MIN_IMAGE_TILES_ONE_CALL: usize = 36;

/// Tiles per thread below which a convolution runs as one block whose 16 products are
/// shared out among the threads.
const FEW_TILES_PER_THREAD: usize = 16;

/// Fewest input and output channels for which they pay off.
pub(crate) const MIN_CHANNELS: usize = 16;

/// The kernel of a 3×3 convolution in the Winograd domain.
#[derive(Debug, Clone)]
pub struct WinogradWeights {
    /// `U[ξ]` (`c_out × c_in`) for each of the 16 positions `ξ` of a transformed tile.
    u: Vec<PackedA>,
    cout: usize,
    cin: usize,
}

impl WinogradWeights {
    /// Transforms the kernel given as `kernel(o, c) = g[o][c]` (row-major 3×3).
    pub fn new(cout: usize, cin: usize, kernel: impl Fn(usize, usize) -> [f32; 9]) -> Self {
        let mut u = vec![vec![0f32; cout * cin]; XI];
        for o in 0..cout {
            for c in 0..cin {
                let t = transform_kernel(&kernel(o, c));
                for (xi, v) in t.into_iter().enumerate() {
                    u[xi][o * cin + c] = v;
                }
            }
        }
        let u = u
            .iter()
            .map(|m| PackedA::new(m, cout, cin, cin, 1))
            .collect();
        Self { u, cout, cin }
    }

    /// Convolves `b` images `x [b, c_in, h·up, w·up]` — the nearest-neighbour ×`up`
    /// upsampling of the `[b, c_in, h, w]` values in `x` — into `y [b, c_out, h·up, w·up]`
    /// (padding 1), adding `bias`. Uses up to `threads` threads.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        x: &[f32],
        b: usize,
        (h, w): (usize, usize),
        up: usize,
        bias: Option<&[f32]>,
        y: &mut [f32],
        threads: usize,
    ) {
        // SAFETY: only values are ever written into the view.
        let y = unsafe { &mut *(y as *mut [f32] as *mut [MaybeUninit<f32>]) };
        self.run_unfilled(x, b, (h, w), up, bias, y, threads)
    }

    /// [`Self::run`] into memory not yet filled; every value of `y` is written.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run_unfilled(
        &self,
        x: &[f32],
        b: usize,
        (h, w): (usize, usize),
        up: usize,
        bias: Option<&[f32]>,
        y: &mut [MaybeUninit<f32>],
        threads: usize,
    ) {
        let (ho, wo) = (h * up, w * up);
        assert_eq!(x.len(), b * self.cin * h * w, "winograd: input size");
        assert_eq!(y.len(), b * self.cout * ho * wo, "winograd: output size");
        let geo = TileGeom {
            up,
            h,
            w,
            ho,
            wo,
            th: ho.div_ceil(2),
            tw: wo.div_ceil(2),
        };
        let rows = b * geo.th;
        let threads = threads.max(1);
        if threads > 1 && rows * geo.tw < threads * FEW_TILES_PER_THREAD {
            // Few tiles: one block, whose products and output transform the threads share
            // (each reads part of the weights instead of all of them).
            let out = y.as_mut_ptr() as *mut f32;
            return super::with_thread_buffer(&BUFFERS, |(v, m)| {
                // SAFETY: the one block writes every output row.
                unsafe { self.block(x, &geo, 0, rows, bias, out, v, m, threads) };
            });
        }
        let per_block = (BLOCK_TILES / geo.tw).max(1);
        // At least one block per thread.
        let per_block = per_block.min(rows.div_ceil(threads)).max(1);
        let blocks: Vec<(usize, usize)> = (0..rows)
            .step_by(per_block)
            .map(|r0| (r0, (r0 + per_block).min(rows)))
            .collect();
        let out = y.as_mut_ptr() as usize;
        let run = |&(r0, r1): &(usize, usize)| {
            super::with_thread_buffer(&BUFFERS, |(v, m)| {
                // SAFETY: blocks cover disjoint rows of tiles, so disjoint output rows.
                unsafe { self.block(x, &geo, r0, r1, bias, out as *mut f32, v, m, 1) };
            })
        };
        if blocks.len() > 1 && threads > 1 {
            blocks.par_iter().for_each(run);
        } else {
            blocks.iter().for_each(run);
        }
    }

    /// Tile rows `r0..r1` (counted over the whole batch); the products and the output
    /// transform on `threads` threads.
    ///
    /// # Safety
    /// `y` must address the whole output, of which this call alone writes those rows.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        &self,
        x: &[f32],
        geo: &TileGeom,
        r0: usize,
        r1: usize,
        bias: Option<&[f32]>,
        y: *mut f32,
        v: &mut Vec<f32>,
        m: &mut Vec<f32>,
        threads: usize,
    ) {
        let (cin, cout, tw) = (self.cin, self.cout, geo.tw);
        let n = (r1 - r0) * tw;
        // The transformed inputs go straight into the layout the products read.
        let layout = PackedLayout::new(cin, n);
        let stride = layout.len();
        v.resize(XI * stride, 0.0);
        m.resize(XI * cout * n, 0.0);
        let plane = geo.h * geo.w;
        let mut scratch = PlaneScratch::default();
        // Pieces of the block inside one image: (image, first tile row, rows, first column).
        let mut pieces = Vec::new();
        let mut r = r0;
        while r < r1 {
            let (image, ty) = (r / geo.th, r % geo.th);
            let rows = (geo.th - ty).min(r1 - r);
            pieces.push((image, ty, rows, (r - r0) * tw));
            r += rows;
        }
        for &(image, ty, rows, col) in &pieces {
            for c in 0..cin {
                let src = &x[(image * cin + c) * plane..][..plane];
                scratch.transform_input(src, geo, ty, rows);
                scratch.write_packed(&layout, v, stride, c, col, rows, tw);
            }
        }
        let product = |(xi, c): (usize, &mut [f32])| {
            let b = Prepacked {
                layout,
                data: &v[xi * stride..][..stride],
            };
            gemm(&self.u[xi], &b, n, Output::new(c, n), false, None, 1);
        };
        let products = &mut m[..XI * cout * n];
        if threads > 1 {
            products
                .par_chunks_mut(cout * n)
                .enumerate()
                .for_each(product);
        } else {
            products.chunks_mut(cout * n).enumerate().for_each(product);
        }
        let out_plane = geo.ho * geo.wo;
        let (m, y) = (&*m, y as usize);
        let outputs = |os: std::ops::Range<usize>| {
            let mut scratch = PlaneScratch::default();
            for o in os {
                let tiles: [&[f32]; XI] = std::array::from_fn(|xi| &m[(xi * cout + o) * n..][..n]);
                let beta = bias.map_or(0.0, |b| b[o]);
                scratch.transform_output(&tiles, beta);
                for &(image, ty, rows, col) in &pieces {
                    // SAFETY: channel `o` of these tile rows is written by this call alone.
                    let dst = unsafe { (y as *mut f32).add((image * cout + o) * out_plane) };
                    unsafe { scratch.write_output(geo, ty, rows, col, dst) };
                }
            }
        };
        if threads > 1 {
            (0..threads)
                .into_par_iter()
                .for_each(|t| outputs(cout * t / threads..cout * (t + 1) / threads));
        } else {
            outputs(0..cout);
        }
    }
}

/// Sizes of a convolution cut into tiles.
struct TileGeom {
    /// Upsampling factor of the stored input.
    up: usize,
    /// Stored input size.
    h: usize,
    w: usize,
    /// Output (= upsampled input) size.
    ho: usize,
    wo: usize,
    /// Tiles down and across.
    th: usize,
    tw: usize,
}

thread_local! {
    /// Per-thread transformed inputs and products of one block.
    static BUFFERS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Working planes of the transforms, whole rows of tiles at once so that every arithmetic
/// loop runs over long vectors.
#[derive(Default)]
struct PlaneScratch {
    /// The padded input rows of a piece split by row parity (`[0]` even, `[1]` odd padded
    /// rows) and column parity (`.0` the padded row's even columns — input columns
    /// 2t − 1 —, `.1` its odd ones — input columns 2t), `tw + 1` values per row.
    split: [(Vec<f32>, Vec<f32>); 2],
    /// Column transforms `d B` of those rows, `cols[parity][j]`, same layout.
    cols: [[Vec<f32>; 4]; 2],
    /// The 16 transformed values of each tile, `v[ξ][row·(tw + 1) + t]`.
    v: [Vec<f32>; XI],
    /// Output transform: rows of `M A` (`[2i]`, `[2i + 1]`), then the four outputs of each
    /// tile (`out[2·dy + dx]`), over the block's tiles.
    ma: [Vec<f32>; 8],
    out: [Vec<f32>; 4],
}

impl PlaneScratch {
    /// `V = Bᵀ d B` for the tiles of tile rows `ty..ty + rows` of one channel `src`
    /// (`h × w`, read upsampled by `geo.up`), into `self.v`.
    fn transform_input(&mut self, src: &[f32], geo: &TileGeom, ty: usize, rows: usize) {
        let (tw, w) = (geo.tw, geo.w);
        let w1 = tw + 1;
        // Padded rows 2·ty ..= 2·(ty + rows) + 1: rows + 1 of each parity.
        for (parity, (even, odd)) in self.split.iter_mut().enumerate() {
            even.resize((rows + 1) * w1, 0.0);
            odd.resize((rows + 1) * w1, 0.0);
            for q in 0..=rows {
                let (ev, od) = (&mut even[q * w1..][..w1], &mut odd[q * w1..][..w1]);
                // Padded row p is input row p − 1.
                let p = 2 * (ty + q) + parity;
                let Some(iy) = p.checked_sub(1).filter(|&iy| iy < geo.ho) else {
                    ev.fill(0.0);
                    od.fill(0.0);
                    continue;
                };
                let row = &src[(iy / geo.up) * w..][..w];
                if geo.up == 2 {
                    // Upsampled column q is row[q / 2]: even[t] = row[t − 1], odd[t] = row[t].
                    ev[0] = 0.0;
                    ev[1..=w].copy_from_slice(row);
                    od[..w].copy_from_slice(row);
                    od[w] = 0.0;
                } else {
                    ev[0] = 0.0;
                    ev[tw] = 0.0;
                    od[tw] = 0.0;
                    dispatch(
                        #[inline(always)]
                        || {
                            for ((o, e), pair) in
                                od.iter_mut().zip(&mut ev[1..]).zip(row.chunks_exact(2))
                            {
                                *o = pair[0];
                                *e = pair[1];
                            }
                        },
                    );
                    if w % 2 == 1 {
                        od[w / 2] = row[w - 1];
                    }
                }
            }
        }
        // Column transforms over whole planes (the last column of each row is unused):
        // columns 2t..2t+3 of a padded row are even[t], odd[t], even[t+1], odd[t+1].
        let len = (rows + 1) * w1 - 1;
        for (parity, (even, odd)) in self.split.iter().enumerate() {
            let cols = &mut self.cols[parity];
            for c in cols.iter_mut() {
                c.resize(len, 0.0);
            }
            let [c0, c1, c2, c3] = cols;
            transform_b(
                [&even[..len], &odd[..len], &even[1..=len], &odd[1..=len]],
                [c0, c1, c2, c3],
            );
        }
        // Row transforms: tile row r uses padded rows 2r (even q = r), 2r + 1 (odd q = r),
        // 2r + 2 (even q = r + 1) and 2r + 3 (odd q = r + 1).
        let len = rows * w1 - 1;
        for v in &mut self.v {
            v.resize(len, 0.0);
        }
        let [ce, co] = &self.cols;
        for j in 0..4 {
            let (de, dn) = (&ce[j], &co[j]);
            let Ok([v0, v1, v2, v3]) = self.v.get_disjoint_mut([j, 4 + j, 8 + j, 12 + j]) else {
                unreachable!()
            };
            transform_b(
                [&de[..len], &dn[..len], &de[w1..w1 + len], &dn[w1..w1 + len]],
                [v0, v1, v2, v3],
            );
        }
    }

    /// Copies `self.v` (tile rows of `tw + 1` values, the last unused) into row `c` of the
    /// 16 packed matrices, columns from `col` on.
    #[allow(clippy::too_many_arguments)]
    fn write_packed(
        &self,
        layout: &PackedLayout,
        out: &mut [f32],
        stride: usize,
        c: usize,
        col: usize,
        rows: usize,
        tw: usize,
    ) {
        let (w1, nr) = (tw + 1, layout.nr());
        for r in 0..rows {
            let mut t = 0;
            while t < tw {
                let j = col + r * tw + t;
                let run = (nr - j % nr).min(tw - t);
                let at = layout.offset(c, j);
                for (xi, v) in self.v.iter().enumerate() {
                    let src = &v[r * w1 + t..][..run];
                    let dst = &mut out[xi * stride + at..][..run];
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d = *s;
                    }
                }
                t += run;
            }
        }
    }

    /// `Aᵀ m A + bias` of every tile of the block, `m[ξ][tile]`, into `self.out`.
    fn transform_output(&mut self, m: &[&[f32]; XI], bias: f32) {
        let n = m[0].len();
        for a in self.ma.iter_mut().chain(self.out.iter_mut()) {
            a.resize(n, 0.0);
        }
        let ma = &mut self.ma;
        let out = &mut self.out;
        dispatch(
            #[inline(always)]
            || {
                // Row i of (M A): m_i0 + m_i1 + m_i2 and m_i1 − m_i2 − m_i3.
                for (i, pair) in ma.chunks_exact_mut(2).enumerate() {
                    let [c0, c1] = pair else { unreachable!() };
                    let (p0, p1, p2, p3) = (
                        &m[4 * i][..n],
                        &m[4 * i + 1][..n],
                        &m[4 * i + 2][..n],
                        &m[4 * i + 3][..n],
                    );
                    let (c0, c1) = (&mut c0[..n], &mut c1[..n]);
                    for t in 0..n {
                        c0[t] = p0[t] + p1[t] + p2[t];
                        c1[t] = p1[t] - p2[t] - p3[t];
                    }
                }
                let e: [&[f32]; 8] = std::array::from_fn(|i| &ma[i][..n]);
                let [a00, a01, a10, a11] = out;
                let (a00, a01, a10, a11) =
                    (&mut a00[..n], &mut a01[..n], &mut a10[..n], &mut a11[..n]);
                for t in 0..n {
                    a00[t] = e[0][t] + e[2][t] + e[4][t] + bias;
                    a01[t] = e[1][t] + e[3][t] + e[5][t] + bias;
                    a10[t] = e[2][t] - e[4][t] - e[6][t] + bias;
                    a11[t] = e[3][t] - e[5][t] - e[7][t] + bias;
                }
            },
        );
    }

    /// Writes the outputs of tile rows `ty..ty + rows` (block columns from `col` on) into
    /// the output plane `dst` (`ho × wo`).
    ///
    /// # Safety
    /// `dst` must address an `ho × wo` plane.
    unsafe fn write_output(
        &self,
        geo: &TileGeom,
        ty: usize,
        rows: usize,
        col: usize,
        dst: *mut f32,
    ) {
        let tw = geo.tw;
        let pairs = geo.wo / 2;
        for r in 0..rows {
            let at = col + r * tw;
            for dy in 0..2 {
                let oy = 2 * (ty + r) + dy;
                if oy >= geo.ho {
                    break;
                }
                let left = &self.out[2 * dy][at..at + tw];
                let right = &self.out[2 * dy + 1][at..at + tw];
                let row = std::slice::from_raw_parts_mut(dst.add(oy * geo.wo), geo.wo);
                dispatch(
                    #[inline(always)]
                    || {
                        for (o, (&l, &r)) in row.chunks_exact_mut(2).zip(left.iter().zip(right)) {
                            o[0] = l;
                            o[1] = r;
                        }
                    },
                );
                if geo.wo % 2 == 1 {
                    row[geo.wo - 1] = left[pairs];
                }
            }
        }
    }
}

/// `(d0 − d2, d1 + d2, d2 − d1, d1 − d3)` element by element (`Bᵀ d`, one 1-d pass of the
/// input transform), over the length of `d0`.
fn transform_b([d0, d1, d2, d3]: [&[f32]; 4], out: [&mut Vec<f32>; 4]) {
    let len = d0.len();
    let [v0, v1, v2, v3] = out;
    dispatch(
        #[inline(always)]
        || {
            let (d1, d2, d3) = (&d1[..len], &d2[..len], &d3[..len]);
            let (v0, v1, v2, v3) = (
                &mut v0[..len],
                &mut v1[..len],
                &mut v2[..len],
                &mut v3[..len],
            );
            for t in 0..len {
                v0[t] = d0[t] - d2[t];
                v1[t] = d1[t] + d2[t];
                v2[t] = d2[t] - d1[t];
                v3[t] = d1[t] - d3[t];
            }
        },
    );
}

/// `U = G g Gᵀ` of a 3×3 kernel `g` (row-major), computed in f64.
fn transform_kernel(g: &[f32; 9]) -> [f32; XI] {
    const G: [[f64; 3]; 4] = [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ];
    let mut gg = [[0f64; 3]; 4];
    for (i, row) in gg.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = (0..3).map(|k| G[i][k] * g[k * 3 + j] as f64).sum();
        }
    }
    let mut u = [0f32; XI];
    for i in 0..4 {
        for j in 0..4 {
            u[i * 4 + j] = (0..3).map(|k| gg[i][k] * G[j][k]).sum::<f64>() as f32;
        }
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct convolution in f64 (padding 1) of the ×`up` upsampling of `x`.
    fn reference(
        x: &[f32],
        wt: &[f32],
        bias: &[f32],
        (b, cin, h, w): (usize, usize, usize, usize),
        cout: usize,
        up: usize,
    ) -> Vec<f32> {
        let (ho, wo) = (h * up, w * up);
        let mut y = vec![0f32; b * cout * ho * wo];
        for n in 0..b {
            for o in 0..cout {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut s = bias[o] as f64;
                        for c in 0..cin {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (oy + ky, ox + kx);
                                    if iy < 1 || ix < 1 || iy > ho || ix > wo {
                                        continue;
                                    }
                                    let (iy, ix) = ((iy - 1) / up, (ix - 1) / up);
                                    let xv = x[((n * cin + c) * h + iy) * w + ix] as f64;
                                    s += xv * wt[((o * cin + c) * 3 + ky) * 3 + kx] as f64;
                                }
                            }
                        }
                        y[((n * cout + o) * ho + oy) * wo + ox] = s as f32;
                    }
                }
            }
        }
        y
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn winograd(wt: &[f32], cout: usize, cin: usize) -> WinogradWeights {
        WinogradWeights::new(cout, cin, |o, c| {
            std::array::from_fn(|i| wt[(o * cin + c) * 9 + i])
        })
    }

    #[test]
    fn matches_the_direct_convolution() {
        // Even and odd sizes, a channel count off the panel height, upsampled input.
        for &(b, cin, h, w, cout, up) in &[
            (2, 5, 6, 8, 13, 1),
            (1, 3, 7, 5, 4, 1),
            (3, 4, 4, 3, 12, 2),
            (1, 17, 1, 1, 2, 1),
            // Enough tiles for blocks of their own on each thread.
            (2, 5, 16, 14, 13, 1),
        ] {
            let x = values(b * cin * h * w, 1);
            let wt = values(cout * cin * 9, 2);
            let bias = values(cout, 3);
            let want = reference(&x, &wt, &bias, (b, cin, h, w), cout, up);
            let mut got = vec![f32::NAN; want.len()];
            winograd(&wt, cout, cin).run(&x, b, (h, w), up, Some(&bias), &mut got, 2);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - e).abs() < 1e-4,
                    "{i}: {g} vs {e} at {b} {cin} {h}x{w} up {up}"
                );
            }
        }
    }

    #[test]
    fn any_batch_and_thread_count_gives_the_same_bits() {
        let (b, cin, h, w, cout) = (5, 6, 10, 12, 7);
        let x = values(b * cin * h * w, 4);
        let wt = values(cout * cin * 9, 5);
        let conv = winograd(&wt, cout, cin);
        let mut all = vec![0f32; b * cout * h * w];
        conv.run(&x, b, (h, w), 1, None, &mut all, 2);
        let mut serial = vec![0f32; all.len()];
        conv.run(&x, b, (h, w), 1, None, &mut serial, 1);
        assert_eq!(all, serial);
        let one = cout * h * w;
        for n in 0..b {
            let mut single = vec![0f32; one];
            let xs = &x[n * cin * h * w..(n + 1) * cin * h * w];
            conv.run(xs, 1, (h, w), 1, None, &mut single, 2);
            assert_eq!(single, all[n * one..(n + 1) * one]);
        }
    }
}
