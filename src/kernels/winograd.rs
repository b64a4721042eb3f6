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

/// Values of a transformed tile (4 × 4).
const XI: usize = 16;

/// Tiles per block that the transforms and products work on at once (about; blocks hold
/// whole rows of tiles).
const BLOCK_TILES: usize = 256;

/// Fewest tiles per image for which the transforms pay off against the direct convolution
/// (measured on an AVX-512 CPU).
pub(crate) const MIN_IMAGE_TILES: usize = 64;

/// Fewest input and output channels for which they pay off.
pub(crate) const MIN_CHANNELS: usize = 96;

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
        let per_block = (BLOCK_TILES / geo.tw).max(1);
        // At least one block per thread.
        let per_block = per_block.min(rows.div_ceil(threads)).max(1);
        let blocks: Vec<(usize, usize)> = (0..rows)
            .step_by(per_block)
            .map(|r0| (r0, (r0 + per_block).min(rows)))
            .collect();
        let out = y.as_mut_ptr() as usize;
        let run = |&(r0, r1): &(usize, usize)| {
            BUFFERS.with(|cell| {
                let mut fresh = (Vec::new(), Vec::new());
                let mut guard = cell.try_borrow_mut();
                let (v, m) = match guard.as_deref_mut() {
                    Ok((v, m)) => (v, m),
                    Err(_) => (&mut fresh.0, &mut fresh.1),
                };
                // SAFETY: blocks cover disjoint rows of tiles, so disjoint output rows.
                unsafe { self.block(x, &geo, r0, r1, bias, out as *mut f32, v, m) };
            })
        };
        if blocks.len() > 1 && threads > 1 {
            blocks.par_iter().for_each(run);
        } else {
            blocks.iter().for_each(run);
        }
    }

    /// Tile rows `r0..r1` (counted over the whole batch).
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
    ) {
        let (cin, cout, tw) = (self.cin, self.cout, geo.tw);
        let n = (r1 - r0) * tw;
        // The transformed inputs go straight into the layout the products read.
        let layout = PackedLayout::new(cin, n);
        let stride = layout.len();
        v.resize(XI * stride, 0.0);
        m.resize(XI * cout * n, 0.0);
        let plane = geo.h * geo.w;
        let mut rows = RowScratch::new(tw);
        let mut runs = Vec::new();
        for r in r0..r1 {
            let (image, ty) = (r / geo.th, r % geo.th);
            let col = (r - r0) * tw;
            for c in 0..cin {
                let src = &x[(image * cin + c) * plane..][..plane];
                rows.transform_input(src, geo, ty);
                // Column runs that stay inside one panel.
                runs.clear();
                let mut t = 0;
                while t < tw {
                    let j = col + t;
                    let run = (layout.nr() - j % layout.nr()).min(tw - t);
                    runs.push((t, run, layout.offset(c, j)));
                    t += run;
                }
                rows.write_rows(&runs, v, stride);
            }
        }
        for xi in 0..XI {
            let b = Prepacked {
                layout,
                data: &v[xi * stride..][..stride],
            };
            let c = Output::new(&mut m[xi * cout * n..][..cout * n], n);
            gemm(&self.u[xi], &b, n, c, false, None, 1);
        }
        let out_plane = geo.ho * geo.wo;
        for r in r0..r1 {
            let (image, ty) = (r / geo.th, r % geo.th);
            let col = (r - r0) * tw;
            for o in 0..cout {
                let tiles: [&[f32]; XI] =
                    std::array::from_fn(|xi| &m[(xi * cout + o) * n + col..][..tw]);
                let beta = bias.map_or(0.0, |b| b[o]);
                let dst = y.add((image * cout + o) * out_plane);
                rows.transform_output(&tiles, beta, geo, ty, dst);
            }
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

/// Working rows for the transforms of one row of tiles.
struct RowScratch {
    /// Columns 2t − 1 (`even`) and 2t (`odd`) of an input row, 0 outside (`tw + 1` each):
    /// the padded row's even and odd columns.
    even: Vec<f32>,
    odd: Vec<f32>,
    /// Column transforms of the four input rows, `e[4i + j][t]`; reused by the output
    /// transform.
    e: Vec<Vec<f32>>,
    /// The four outputs of each tile, `out[2·dy + dx][t]`.
    out: Vec<Vec<f32>>,
}

impl RowScratch {
    fn new(tw: usize) -> Self {
        Self {
            even: vec![0.0; tw + 1],
            odd: vec![0.0; tw + 1],
            e: vec![vec![0.0; tw]; XI],
            out: vec![vec![0.0; tw]; 4],
        }
    }

    /// Splits input row `iy` (of the upsampled image; `None` for padding) into the padded
    /// row's even and odd columns.
    fn split_row(&mut self, src: &[f32], geo: &TileGeom, iy: Option<usize>) {
        let (tw, w) = (geo.tw, geo.w);
        let (even, odd) = (&mut self.even[..=tw], &mut self.odd[..=tw]);
        let Some(iy) = iy else {
            even.fill(0.0);
            odd.fill(0.0);
            return;
        };
        let row = &src[(iy / geo.up) * w..][..w];
        if geo.up == 2 {
            // Upsampled column q is row[q / 2]: even[t] = row[t − 1], odd[t] = row[t].
            even[0] = 0.0;
            even[1..=w].copy_from_slice(row);
            odd[..w].copy_from_slice(row);
            odd[w] = 0.0;
        } else {
            // even[t] = x[2t − 1], odd[t] = x[2t], 0 outside the row.
            even[0] = 0.0;
            even[tw] = 0.0;
            odd[tw] = 0.0;
            dispatch(
                #[inline(always)]
                || {
                    for ((o, e), pair) in
                        odd.iter_mut().zip(&mut even[1..]).zip(row.chunks_exact(2))
                    {
                        *o = pair[0];
                        *e = pair[1];
                    }
                },
            );
            if w % 2 == 1 {
                odd[w / 2] = row[w - 1];
            }
        }
    }

    /// The column transforms `d B` of the four input rows of tile row `ty` of one channel
    /// `src` (`h × w`, read upsampled by `geo.up`), for [`Self::write_rows`].
    fn transform_input(&mut self, src: &[f32], geo: &TileGeom, ty: usize) {
        let tw = geo.tw;
        debug_assert!(geo.up == 1 || geo.up == 2);
        for i in 0..4 {
            let iy = (2 * ty + i).checked_sub(1).filter(|&iy| iy < geo.ho);
            self.split_row(src, geo, iy);
            let (ev, od) = (&self.even[..=tw], &self.odd[..=tw]);
            let Ok([e0, e1, e2, e3]) =
                self.e
                    .get_disjoint_mut([4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3])
            else {
                unreachable!()
            };
            // Columns 2t..2t+3 of the padded row are even[t], odd[t], even[t+1], odd[t+1].
            dispatch(
                #[inline(always)]
                || {
                    for t in 0..tw {
                        let (a, b, c, d) = (ev[t], od[t], ev[t + 1], od[t + 1]);
                        e0[t] = a - c;
                        e1[t] = b + c;
                        e2[t] = c - b;
                        e3[t] = b - d;
                    }
                },
            );
        }
    }

    /// Writes the 16 transformed rows `v[ξ][t]` (from [`Self::transform_input`]'s column
    /// transforms) for tiles `t` with `dst(t)` the offset of `(ξ = 0, t)` in `out` and
    /// `stride` the distance between consecutive `ξ`; `runs` lists `(t, run, dst)` of
    /// contiguous pieces.
    fn write_rows(&self, runs: &[(usize, usize, usize)], out: &mut [f32], stride: usize) {
        let e = &self.e;
        dispatch(
            #[inline(always)]
            || {
                for &(t0, run, at) in runs {
                    for j in 0..4 {
                        let (r0, r1, r2, r3) = (
                            &e[j][t0..t0 + run],
                            &e[4 + j][t0..t0 + run],
                            &e[8 + j][t0..t0 + run],
                            &e[12 + j][t0..t0 + run],
                        );
                        let (head, rest) = out.split_at_mut(at + (4 + j) * stride);
                        let w0 = &mut head[at + j * stride..][..run];
                        let (w1, rest) = rest.split_at_mut((8 + j) * stride - (4 + j) * stride);
                        let (w2, w3) = rest.split_at_mut(4 * stride);
                        let (w1, w2, w3) = (&mut w1[..run], &mut w2[..run], &mut w3[..run]);
                        for t in 0..run {
                            w0[t] = r0[t] - r2[t];
                            w1[t] = r1[t] + r2[t];
                            w2[t] = r2[t] - r1[t];
                            w3[t] = r1[t] - r3[t];
                        }
                    }
                }
            },
        );
    }

    /// Writes `Aᵀ m A + bias` of every tile of tile row `ty` into the output plane `dst`
    /// (`ho × wo`); `m[ξ][t]`.
    ///
    /// # Safety
    /// `dst` must address an `ho × wo` plane.
    unsafe fn transform_output(
        &mut self,
        m: &[&[f32]; XI],
        bias: f32,
        geo: &TileGeom,
        ty: usize,
        dst: *mut f32,
    ) {
        let tw = geo.tw;
        let Ok(mut e) = self.e.get_disjoint_mut([0, 1, 2, 3, 4, 5, 6, 7]) else {
            unreachable!()
        };
        let [a00, a01, a10, a11] = &mut self.out[..] else {
            unreachable!()
        };
        dispatch(
            #[inline(always)]
            || {
                // Row i of (M A) in e[2i] and e[2i + 1]: m_i0 + m_i1 + m_i2, m_i1 − m_i2 − m_i3.
                for (i, pair) in e.chunks_exact_mut(2).enumerate() {
                    let [c0, c1] = pair else { unreachable!() };
                    let (p0, p1, p2, p3) = (
                        &m[4 * i][..tw],
                        &m[4 * i + 1][..tw],
                        &m[4 * i + 2][..tw],
                        &m[4 * i + 3][..tw],
                    );
                    let (c0, c1) = (&mut c0[..tw], &mut c1[..tw]);
                    for t in 0..tw {
                        c0[t] = p0[t] + p1[t] + p2[t];
                        c1[t] = p1[t] - p2[t] - p3[t];
                    }
                }
                let e: [&[f32]; 8] = std::array::from_fn(|i| &e[i][..tw]);
                let (a00, a01, a10, a11) = (
                    &mut a00[..tw],
                    &mut a01[..tw],
                    &mut a10[..tw],
                    &mut a11[..tw],
                );
                for t in 0..tw {
                    a00[t] = e[0][t] + e[2][t] + e[4][t] + bias;
                    a01[t] = e[1][t] + e[3][t] + e[5][t] + bias;
                    a10[t] = e[2][t] - e[4][t] - e[6][t] + bias;
                    a11[t] = e[3][t] - e[5][t] - e[7][t] + bias;
                }
            },
        );
        for (dy, (left, right)) in [(&*a00, &*a01), (&*a10, &*a11)].into_iter().enumerate() {
            let oy = 2 * ty + dy;
            if oy >= geo.ho {
                break;
            }
            let row = std::slice::from_raw_parts_mut(dst.add(oy * geo.wo), geo.wo);
            let pairs = geo.wo / 2;
            dispatch(
                #[inline(always)]
                || {
                    for (out, (&l, &r)) in row.chunks_exact_mut(2).zip(left.iter().zip(right)) {
                        out[0] = l;
                        out[1] = r;
                    }
                },
            );
            if geo.wo % 2 == 1 {
                row[geo.wo - 1] = left[pairs];
            }
        }
    }
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
