//! 2-d convolution and transposed convolution on the CPU as packed matrix products.
//!
//! A convolution of one image is `y = W · cols(x)` with `W` the `c_out × c_in·k·k` kernel
//! matrix, packed once ([`ConvWeights::new`]), and `cols(x)` the im2col matrix, which is
//! never built: [`Im2col`] writes its blocks straight into the product's packed panels.
//! Images of a batch run in parallel; a single image splits its columns over the threads.
//! The bias is added in the product's last pass. A transposed convolution is the adjoint:
//! `y = col2im(Wᵀ · x)`.

use super::gemm::{gemm, kernel_threads, Matrix, Output, PackedA, PanelSource};
use super::math::dispatch;
use super::winograd::{self, WinogradWeights};
use super::{f32_values, tensor_values, written};
use candle_core::{CpuStorage, CustomOp1, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geom {
    pub(crate) b: usize,
    pub(crate) cin: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) cout: usize,
    pub(crate) k: usize,
    pub(crate) stride: usize,
    pub(crate) pad: usize,
    pub(crate) ho: usize,
    pub(crate) wo: usize,
}

impl Geom {
    pub(crate) fn new(x: &[usize], wt: &[usize], stride: usize, pad: usize) -> Result<Self> {
        let (&[b, cin, h, w], &[cout, wcin, k, k2]) = (x, wt) else {
            return Err(Error::Msg(format!(
                "conv2d: input {x:?} and weight {wt:?} must both be 4-d"
            )));
        };
        if wcin != cin
            || k != k2
            || stride == 0
            || h == 0
            || w == 0
            || h + 2 * pad < k
            || w + 2 * pad < k
        {
            return Err(Error::Msg(format!(
                "conv2d: input {x:?} does not fit weight {wt:?} (stride {stride}, padding {pad})"
            )));
        }
        Ok(Self {
            b,
            cin,
            h,
            w,
            cout,
            k,
            stride,
            pad,
            ho: (h + 2 * pad - k) / stride + 1,
            wo: (w + 2 * pad - k) / stride + 1,
        })
    }

    pub(crate) fn ckk(&self) -> usize {
        self.cin * self.k * self.k
    }

    pub(crate) fn in_len(&self) -> usize {
        self.cin * self.h * self.w
    }

    pub(crate) fn out_len(&self) -> usize {
        self.cout * self.ho * self.wo
    }

    pub(crate) fn pixels(&self) -> usize {
        self.ho * self.wo
    }

    /// True when the columns are the input itself (1×1, stride 1, no padding).
    pub(crate) fn trivial_cols(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }

    /// Source row of output row `o` at kernel offset `kk`, if inside the input.
    #[inline]
    pub(crate) fn src(&self, o: usize, kk: usize, limit: usize) -> Option<usize> {
        (o * self.stride + kk)
            .checked_sub(self.pad)
            .filter(|&i| i < limit)
    }

    /// Output columns `lo..hi` whose source column `ox·s + kx − p` lies inside the input.
    #[inline]
    pub(crate) fn valid_cols(&self, kx: usize) -> (usize, usize) {
        let s = self.stride;
        // ox·s + kx ≥ p  ⇔  ox ≥ ceil((p − kx) / s).
        let lo = self.pad.saturating_sub(kx).div_ceil(s).min(self.wo);
        // ox·s + kx − p ≤ w − 1  ⇔  ox ≤ (w − 1 + p − kx) / s.
        let hi = match (self.w - 1 + self.pad).checked_sub(kx) {
            Some(v) => (v / s + 1).min(self.wo),
            None => 0,
        };
        (lo, hi.max(lo))
    }

    /// Adjoint of the column matrix `cols[(c·k + ky)·k + kx][oy·wo + ox]` (see [`Im2col`]):
    /// accumulates `cols` into `dx` (which must start at zero).
    pub(crate) fn col2im(&self, cols: &[f32], dx: &mut [f32]) {
        let (k, p, s) = (self.k, self.pixels(), self.stride);
        for c in 0..self.cin {
            let plane = &mut dx[c * self.h * self.w..(c + 1) * self.h * self.w];
            for ky in 0..k {
                for kx in 0..k {
                    let row = &cols[((c * k + ky) * k + kx) * p..][..p];
                    let (lo, hi) = self.valid_cols(kx);
                    if lo >= hi {
                        continue;
                    }
                    for oy in 0..self.ho {
                        let Some(iy) = self.src(oy, ky, self.h) else {
                            continue;
                        };
                        let src = &row[oy * self.wo + lo..oy * self.wo + hi];
                        let start = iy * self.w + lo * s + kx - self.pad;
                        if s == 1 {
                            for (d, v) in plane[start..start + (hi - lo)].iter_mut().zip(src) {
                                *d += v;
                            }
                        } else {
                            for (d, v) in plane[start..].iter_mut().step_by(s).zip(src) {
                                *d += v;
                            }
                        }
                    }
                }
            }
        }
    }
}
/// The im2col columns of a batch of images side by side, as a [`PanelSource`]: row
/// `(c·k + ky)·k + kx`, column `b·pixels + oy·wo + ox` holds
/// `x[b][c][oy·s + ky − p][ox·s + kx − p]` (0 outside the image).
///
/// With `up = 2` the convolution's input is the nearest-neighbour ×2 upsampling of `x`
/// (`g` describes the upsampled image), read from `x` without being built.
pub(crate) struct Im2col<'a> {
    pub(crate) g: &'a Geom,
    pub(crate) x: &'a [f32],
    pub(crate) up: usize,
}

/// A run of consecutive output pixels of one image row inside a panel.
#[derive(Clone, Copy, Default)]
struct Run {
    /// First column of the run inside the panel.
    d: usize,
    /// Length.
    len: usize,
    /// Offset of the image in the input.
    image: usize,
    oy: usize,
    ox: usize,
}

/// The transposed im2col columns of a batch of channels-last images `x[b][y][x][c]`, with
/// the columns in tap-major order, as a [`PanelSource`]: row `b·pixels + oy·wo + ox`,
/// column `(ky·k + kx)·cin + c` holds `x[b][oy·s + ky − p][ox·s + kx − p][c]` (0 outside
/// the image). Each tap's channels are contiguous in the input, so rows are copied in runs.
pub(crate) struct Im2colChannelsLastT<'a> {
    pub(crate) g: &'a Geom,
    pub(crate) x: &'a [f32],
}

impl PanelSource for Im2colChannelsLastT<'_> {
    fn pack(&self, k0: usize, kc: usize, n0: usize, len: usize, nr: usize, out: &mut [f32]) {
        let g = self.g;
        let (kk, cin, pixels, in_len) = (g.k * g.k, g.cin, g.pixels(), g.in_len());
        let panels = len.div_ceil(nr);
        // Offset in the image of each kernel tap's channels (`usize::MAX`: outside).
        let mut taps = vec![usize::MAX; kk];
        for p in 0..kc {
            let (b, pixel) = ((k0 + p) / pixels, (k0 + p) % pixels);
            let (oy, ox) = (pixel / g.wo, pixel % g.wo);
            for (t, tap) in taps.iter_mut().enumerate() {
                *tap = match (g.src(oy, t / g.k, g.h), g.src(ox, t % g.k, g.w)) {
                    (Some(iy), Some(ix)) => (iy * g.w + ix) * cin,
                    _ => usize::MAX,
                };
            }
            let image = &self.x[b * in_len..][..in_len];
            for jp in 0..panels {
                let j0 = n0 + jp * nr;
                let w = nr.min(n0 + len - j0);
                let dst = &mut out[(jp * kc + p) * nr..][..nr];
                let mut d = 0;
                while d < w {
                    let (t, c) = ((j0 + d) / cin, (j0 + d) % cin);
                    let run = (cin - c).min(w - d);
                    let seg = &mut dst[d..d + run];
                    match taps[t] {
                        usize::MAX => seg.fill(0.0),
                        tap => seg.copy_from_slice(&image[tap + c..][..run]),
                    }
                    d += run;
                }
                dst[w..].fill(0.0);
            }
        }
    }
}

impl Im2col<'_> {
    /// Packs like [`PanelSource::pack`] through a table of each column's source offset per
    /// kernel tap: for small images, whose output rows are too short for runs to pay.
    #[inline(always)]
    fn pack_by_table(
        &self,
        k0: usize,
        kc: usize,
        n0: usize,
        len: usize,
        nr: usize,
        out: &mut [f32],
    ) {
        const NONE: usize = usize::MAX;
        let g = self.g;
        let (k, plane_len, pixels) = (g.k, g.h * g.w, g.pixels());
        let image_len = g.cin * plane_len;
        let mut table = vec![NONE; k * k * nr];
        for (jp, panel) in out[..len.div_ceil(nr) * kc * nr]
            .chunks_exact_mut(kc * nr)
            .enumerate()
        {
            let j0 = n0 + jp * nr;
            let w = nr.min(n0 + len - j0);
            for (t, offsets) in table.chunks_exact_mut(nr).enumerate() {
                let (ky, kx) = (t / k, t % k);
                for (d, o) in offsets.iter_mut().enumerate() {
                    *o = NONE;
                    if d < w {
                        let (image, pixel) = ((j0 + d) / pixels, (j0 + d) % pixels);
                        let (oy, ox) = (pixel / g.wo, pixel % g.wo);
                        if let (Some(iy), Some(ix)) = (g.src(oy, ky, g.h), g.src(ox, kx, g.w)) {
                            *o = image * image_len + iy * g.w + ix;
                        }
                    }
                }
            }
            let (mut c, mut t) = (k0 / (k * k), k0 % (k * k));
            for dst in panel.chunks_exact_mut(nr) {
                let plane = &self.x[c * plane_len..];
                for (v, &o) in dst.iter_mut().zip(&table[t * nr..(t + 1) * nr]) {
                    *v = if o == NONE { 0.0 } else { plane[o] };
                }
                t += 1;
                if t == k * k {
                    t = 0;
                    c += 1;
                }
            }
        }
    }

    /// Packs like [`PanelSource::pack`] run by run along the output rows.
    #[inline(always)]
    fn pack_by_runs(
        &self,
        k0: usize,
        kc: usize,
        n0: usize,
        len: usize,
        nr: usize,
        out: &mut [f32],
    ) {
        let g = self.g;
        let up = self.up;
        let (src_h, src_w) = (g.h / up, g.w / up);
        let (k, s, plane_len, pixels) = (g.k, g.stride, src_h * src_w, g.pixels());
        let image_len = g.cin * plane_len;
        let mut runs = [Run::default(); 64];
        for (jp, panel) in out[..len.div_ceil(nr) * kc * nr]
            .chunks_exact_mut(kc * nr)
            .enumerate()
        {
            let j0 = n0 + jp * nr;
            let w = nr.min(n0 + len - j0);
            // The panel's columns as runs along output rows (computed once per panel).
            let mut count = 0;
            let (mut d, mut q) = (0, j0);
            while d < w {
                let (image, pixel) = (q / pixels, q % pixels);
                let (oy, ox) = (pixel / g.wo, pixel % g.wo);
                let run = (g.wo - ox).min(w - d);
                runs[count] = Run {
                    d,
                    len: run,
                    image: image * image_len,
                    oy,
                    ox,
                };
                count += 1;
                d += run;
                q += run;
            }
            let (mut c, mut ky, mut kx) = (k0 / (k * k), (k0 / k) % k, k0 % k);
            for p in 0..kc {
                let dst = &mut panel[p * nr..(p + 1) * nr];
                let (lo, hi) = g.valid_cols(kx);
                for r in &runs[..count] {
                    let seg = &mut dst[r.d..r.d + r.len];
                    let Some(iy) = g.src(r.oy, ky, g.h) else {
                        seg.fill(0.0);
                        continue;
                    };
                    let a = lo.clamp(r.ox, r.ox + r.len);
                    let b = hi.clamp(a, r.ox + r.len);
                    seg[..a - r.ox].fill(0.0);
                    seg[b - r.ox..].fill(0.0);
                    if a < b {
                        let plane = &self.x[r.image + c * plane_len..][..plane_len];
                        let seg = &mut seg[a - r.ox..b - r.ox];
                        if up > 1 {
                            // Column ix of the upsampled row is column ix / up of the source.
                            let row = &plane[(iy / up) * src_w..][..src_w];
                            let first = a * s + kx - g.pad;
                            for (t, v) in seg.iter_mut().enumerate() {
                                *v = row[(first + t * s) / up];
                            }
                            continue;
                        }
                        let start = iy * g.w + a * s + kx - g.pad;
                        if s == 1 {
                            seg.copy_from_slice(&plane[start..start + (b - a)]);
                        } else if s == 2 {
                            // Every other value, as pairs (which vectorises).
                            let (last, head) = seg.split_last_mut().expect("a < b");
                            let pairs = plane[start..start + 2 * head.len()].chunks_exact(2);
                            for (v, pair) in head.iter_mut().zip(pairs) {
                                *v = pair[0];
                            }
                            *last = plane[start + 2 * head.len()];
                        } else {
                            for (v, src) in seg.iter_mut().zip(plane[start..].iter().step_by(s)) {
                                *v = *src;
                            }
                        }
                    }
                }
                dst[w..].fill(0.0);
                kx += 1;
                if kx == k {
                    kx = 0;
                    ky += 1;
                    if ky == k {
                        ky = 0;
                        c += 1;
                    }
                }
            }
        }
    }
}

impl PanelSource for Im2col<'_> {
    fn pack(&self, k0: usize, kc: usize, n0: usize, len: usize, nr: usize, out: &mut [f32]) {
        // Compiled for the active instruction set (the strided gathers vectorise).
        dispatch(
            #[inline(always)]
            || {
                if self.up == 1 && 2 * self.g.wo < nr {
                    self.pack_by_table(k0, kc, n0, len, nr, out)
                } else {
                    self.pack_by_runs(k0, kc, n0, len, nr, out)
                }
            },
        )
    }
}

/// A convolution's kernel packed for [`gemm`], with its bias and geometry.
#[derive(Debug, Clone)]
pub struct ConvWeights {
    packed: PackedA,
    bias: Option<Vec<f32>>,
    dims: [usize; 4],
    stride: usize,
    pad: usize,
    /// The kernel in the Winograd domain, built the first time an inference call can use
    /// it.
    winograd: OnceLock<WinogradWeights>,
}

impl ConvWeights {
    /// Packs `weight [c_out, c_in, k, k]` and `bias [c_out]`.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>, stride: usize, pad: usize) -> Result<Self> {
        let w = tensor_values(weight)?;
        let bias = bias.map(tensor_values).transpose()?;
        Self::from_slice(&w, weight.dims(), bias, stride, pad)
    }

    /// A kernel of shape `[c_out, c_in, k, k]` already packed as `c_out × (c_in·k·k)`.
    pub(crate) fn from_packed(
        packed: PackedA,
        dims: [usize; 4],
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        let [cout, cin, k, k2] = dims;
        if k != k2 || stride == 0 || packed.rows() != cout || packed.depth() != cin * k * k {
            return Err(Error::Msg(format!(
                "conv2d: packed kernel does not fit {dims:?} with stride {stride}"
            )));
        }
        Ok(Self {
            packed,
            bias: None,
            dims,
            stride,
            pad,
            winograd: OnceLock::new(),
        })
    }

    /// Packs a contiguous kernel `w` of shape `dims` (`[c_out, c_in, k, k]`).
    pub fn from_slice(
        w: &[f32],
        dims: &[usize],
        bias: Option<Vec<f32>>,
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        let &[cout, cin, k, k2] = dims else {
            return Err(Error::Msg(format!("conv2d: kernel {dims:?} must be 4-d")));
        };
        let ckk = cin * k * k;
        if k != k2 || stride == 0 || w.len() != cout * ckk {
            return Err(Error::Msg(format!(
                "conv2d: kernel {dims:?} must be square, stride {stride} positive"
            )));
        }
        if bias.as_ref().is_some_and(|b| b.len() != cout) {
            return Err(Error::Msg(format!(
                "conv2d: bias does not have {cout} values"
            )));
        }
        Ok(Self {
            packed: PackedA::new(w, cout, ckk, ckk, 1),
            bias,
            dims: [cout, cin, k, k],
            stride,
            pad,
            winograd: OnceLock::new(),
        })
    }

    /// `x [B, c_in, H, W]` (F32, CPU) → `[B, c_out, Ho, Wo]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    /// The convolution of `x`'s nearest-neighbour ×2 upsampling, which is never built.
    pub fn forward_upsampled2(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&Upsampled2(self))
    }

    /// Convolves contiguous images `x` (shape `dims`) into a new buffer, written once (never
    /// zero-filled first), by Winograd's product where that is faster although its weights
    /// are transformed for this one call (see [`Self::infer`]): for training, whose weights
    /// change at every step.
    pub(crate) fn run_new(&self, x: &[f32], dims: &[usize]) -> Result<(Vec<f32>, Geom)> {
        let g = Geom::new(dims, &self.dims, self.stride, self.pad)?;
        let min_tiles = winograd::MIN_IMAGE_TILES_ONE_CALL;
        let y = self.infer_new(x, dims, 1, g.b * g.out_len(), min_tiles)?;
        Ok((y, g))
    }

    /// Runs [`Self::infer`] into a new buffer, written once (never zero-filled first).
    fn infer_new(
        &self,
        x: &[f32],
        dims: &[usize],
        up: usize,
        len: usize,
        min_tiles: usize,
    ) -> Result<Vec<f32>> {
        // SAFETY: `infer` writes all `len` values when it succeeds.
        unsafe { written(len, |y| self.infer(x, dims, up, y, min_tiles).map(|_| ())) }
    }

    /// Like [`Self::run_upsampled`], but by Winograd's F(2×2, 3×3) where that is faster
    /// (3×3 kernels, stride 1, padding 1, wide enough layers, images of at least `min_tiles`
    /// tiles).
    /// Results differ from the direct product by rounding (the gradients of the training
    /// convolution are those of the exact product).
    fn infer(
        &self,
        x: &[f32],
        dims: &[usize],
        up: usize,
        y: &mut [MaybeUninit<f32>],
        min_tiles: usize,
    ) -> Result<Geom> {
        let g = self.checked_geom(x, dims, up, y)?;
        // Decided per image, so that an image gives the same bits in any batch.
        let tiles = g.ho.div_ceil(2) * g.wo.div_ceil(2);
        if g.k == 3
            && g.stride == 1
            && g.pad == 1
            && (up == 1 || up == 2)
            && g.cin >= winograd::MIN_CHANNELS
            && g.cout >= winograd::MIN_CHANNELS
            && tiles >= min_tiles
        {
            let wg = self.winograd.get_or_init(|| {
                WinogradWeights::new(g.cout, g.cin, |o, c| {
                    std::array::from_fn(|i| self.packed.value(o, c * 9 + i))
                })
            });
            let (h, w) = (g.h / up, g.w / up);
            wg.run_unfilled(
                x,
                g.b,
                (h, w),
                up,
                self.bias.as_deref(),
                y,
                kernel_threads(),
            );
        } else {
            self.direct(x, &g, up, y);
        }
        Ok(g)
    }

    /// The geometry of convolving the ×`up` upsampling of `x` (shape `dims`) into `y`, or
    /// an error when the shapes or buffer sizes do not fit.
    fn checked_geom(
        &self,
        x: &[f32],
        dims: &[usize],
        up: usize,
        y: &[MaybeUninit<f32>],
    ) -> Result<Geom> {
        let &[b, c, h, w] = dims else {
            return Err(Error::Msg(format!("conv2d: input {dims:?} must be 4-d")));
        };
        let g = Geom::new(&[b, c, h * up, w * up], &self.dims, self.stride, self.pad)?;
        if y.len() != g.b * g.out_len() || x.len() * up * up != g.b * g.in_len() {
            return Err(Error::Msg("conv2d: buffer sizes do not match".into()));
        }
        Ok(g)
    }

    /// The packed product `W · cols(x)` for a checked geometry.
    fn direct(&self, x: &[f32], g: &Geom, up: usize, y: &mut [MaybeUninit<f32>]) {
        let bias = self.bias.as_deref();
        let (n, threads) = (g.pixels(), kernel_threads());
        let out = Output::batch_unfilled(y, g.cout, n);
        if g.trivial_cols() && up == 1 {
            let src = Matrix::batch(x, g.cin, n);
            gemm(&self.packed, &src, g.b * n, out, false, bias, threads);
        } else {
            let src = Im2col { g, x, up };
            gemm(&self.packed, &src, g.b * n, out, false, bias, threads);
        }
    }
}

impl CustomOp1 for ConvWeights {
    fn name(&self) -> &'static str {
        "packed-conv2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_values(s, l, "conv2d input")?;
        let g = Geom::new(l.dims(), &self.dims, self.stride, self.pad)?;
        let min_tiles = winograd::MIN_IMAGE_TILES;
        let y = self.infer_new(x, l.dims(), 1, g.b * g.out_len(), min_tiles)?;
        Ok((CpuStorage::F32(y), Shape::from((g.b, g.cout, g.ho, g.wo))))
    }
}

/// [`ConvWeights`] applied to the ×2 nearest-neighbour upsampling of its input.
struct Upsampled2<'a>(&'a ConvWeights);

impl CustomOp1 for Upsampled2<'_> {
    fn name(&self) -> &'static str {
        "packed-upsample2-conv2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_values(s, l, "conv2d input")?;
        let &[b, c, h, w] = l.dims() else {
            return Err(Error::Msg(format!(
                "conv2d: input {:?} must be 4-d",
                l.dims()
            )));
        };
        let g = Geom::new(
            &[b, c, 2 * h, 2 * w],
            &self.0.dims,
            self.0.stride,
            self.0.pad,
        )?;
        let min_tiles = winograd::MIN_IMAGE_TILES;
        let y = self
            .0
            .infer_new(x, l.dims(), 2, g.b * g.out_len(), min_tiles)?;
        Ok((CpuStorage::F32(y), Shape::from((g.b, g.cout, g.ho, g.wo))))
    }
}

/// A transposed convolution's kernel `[c_in, c_out, k, k]` packed as `Wᵀ` (rows
/// `(o·k + ky)·k + kx`, columns `c_in`), with its bias.
#[derive(Debug, Clone)]
pub struct ConvTransposeWeights {
    packed: PackedA,
    bias: Option<Vec<f32>>,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl ConvTransposeWeights {
    /// Packs `weight [c_in, c_out, k, k]` and `bias [c_out]` (no output padding, no
    /// dilation, one group).
    pub fn new(weight: &Tensor, bias: Option<&Tensor>, stride: usize, pad: usize) -> Result<Self> {
        let (cin, cout, k, k2) = weight.dims4()?;
        if k != k2 || stride == 0 {
            return Err(Error::Msg(format!(
                "conv_transpose2d: kernel {:?} must be square, stride {stride} positive",
                weight.dims()
            )));
        }
        let w = tensor_values(weight)?;
        let bias = bias.map(tensor_values).transpose()?;
        if bias.as_ref().is_some_and(|b| b.len() != cout) {
            return Err(Error::Msg(format!(
                "conv_transpose2d: bias does not have {cout} values"
            )));
        }
        let rows = cout * k * k;
        Ok(Self {
            packed: PackedA::new(&w, rows, cin, 1, rows),
            bias,
            cin,
            cout,
            k,
            stride,
            pad,
        })
    }

    /// `x [B, c_in, H, W]` (F32, CPU) → `[B, c_out, (H−1)·s − 2p + k, …]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    /// The geometry of the forward convolution this op is the adjoint of.
    fn geom(&self, dims: &[usize]) -> Result<Geom> {
        let &[b, cin, h, w] = dims else {
            return Err(Error::Msg(format!(
                "conv_transpose2d: input {dims:?} must be 4-d"
            )));
        };
        let (s, k, p) = (self.stride, self.k, self.pad);
        let ho = ((h.max(1) - 1) * s + k).checked_sub(2 * p);
        let wo = ((w.max(1) - 1) * s + k).checked_sub(2 * p);
        let (Some(ho), Some(wo)) = (ho, wo) else {
            return Err(Error::Msg(format!(
                "conv_transpose2d: input {dims:?} too small"
            )));
        };
        if cin != self.cin || h == 0 || w == 0 {
            return Err(Error::Msg(format!(
                "conv_transpose2d: input {dims:?} does not fit a kernel for {} channels",
                self.cin
            )));
        }
        let g = Geom::new(&[b, self.cout, ho, wo], &[cin, self.cout, k, k], s, p)?;
        if (g.ho, g.wo) != (h, w) {
            return Err(Error::Msg(format!(
                "conv_transpose2d: input {dims:?} is not invertible"
            )));
        }
        Ok(g)
    }
}

impl CustomOp1 for ConvTransposeWeights {
    fn name(&self) -> &'static str {
        "packed-conv-transpose2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_values(s, l, "conv_transpose2d input")?;
        // `g` maps the output (as its input) to this op's input (as its output).
        let g = self.geom(l.dims())?;
        let mut y = vec![0f32; g.b * g.in_len()];
        let n = g.pixels();
        // cols (c_out·k·k × batch·pixels) = Wᵀ · x, then each image's columns back to pixels.
        let mut cols = vec![0f32; g.b * g.ckk() * n];
        let src = Matrix::batch(x, self.cin, n);
        let out = Output::batch(&mut cols, g.ckk(), n);
        gemm(
            &self.packed,
            &src,
            g.b * n,
            out,
            false,
            None,
            kernel_threads(),
        );
        let per_image = |(y_b, cols_b): (&mut [f32], &[f32])| {
            g.col2im(cols_b, y_b);
            if let Some(bias) = &self.bias {
                for (plane, &v) in y_b.chunks_mut(g.h * g.w).zip(bias) {
                    plane.iter_mut().for_each(|y| *y += v);
                }
            }
        };
        let (in_len, cols_len) = (g.in_len().max(1), (g.ckk() * n).max(1));
        if g.b > 1 && kernel_threads() > 1 {
            y.par_chunks_mut(in_len)
                .zip(cols.par_chunks(cols_len))
                .for_each(per_image);
        } else {
            y.chunks_mut(in_len)
                .zip(cols.chunks(cols_len))
                .for_each(per_image);
        }
        Ok((CpuStorage::F32(y), Shape::from((g.b, g.cin, g.h, g.w))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::max_abs_diff;
    use candle_core::{DType, Device};

    /// The packed convolution matches candle's for 3×3, strided, 1×1 and odd shapes, with
    /// and without bias, alone and in a batch; a batch gives each image's own bits.
    #[test]
    fn packed_convolution_matches_candle() {
        let dev = Device::Cpu;
        for (b, cin, cout, k, stride, pad, h, w) in [
            (1, 3, 5, 3, 1, 1, 7, 9),
            (3, 4, 13, 3, 2, 1, 8, 8),
            (2, 4, 6, 1, 1, 0, 5, 5),
            (2, 20, 30, 3, 1, 1, 33, 17),
            (1, 8, 4, 4, 2, 1, 6, 6),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
            let want = x
                .conv2d(&wt, pad, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            let got = ConvWeights::new(&wt, Some(&bias), stride, pad)
                .unwrap()
                .forward(&x)
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(
                max_abs_diff(&got, &want) < 1e-4,
                "conv {cin}->{cout} k{k} s{stride}"
            );
            let one = ConvWeights::new(&wt, Some(&bias), stride, pad)
                .unwrap()
                .forward(&x.narrow(0, b - 1, 1).unwrap())
                .unwrap();
            let last = got.narrow(0, b - 1, 1).unwrap();
            assert_eq!(
                one.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                last.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "an image alone differs from the same image in a batch"
            );
        }
    }

    #[test]
    fn winograd_inference_matches_candle_in_any_batch() {
        let dev = Device::Cpu;
        // Wide 3×3 layers on large enough images take the Winograd route, plain and
        // upsampled (odd sizes included).
        for (b, cin, cout, h, w, up) in [
            (3, 96, 100, 16, 18, 1),
            (2, 97, 96, 9, 8, 2),
            (2, 96, 96, 17, 15, 1),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.05, (cout, cin, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
            let conv = ConvWeights::new(&wt, Some(&bias), 1, 1).unwrap();
            let (input, got) = if up == 1 {
                (x.clone(), conv.forward(&x).unwrap())
            } else {
                let big = x.upsample_nearest2d(h * up, w * up).unwrap();
                (big, conv.forward_upsampled2(&x).unwrap())
            };
            assert!(
                conv.winograd.get().is_some(),
                "{cin}->{cout} {h}x{w} up {up}"
            );
            let want = input
                .conv2d(&wt, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(max_abs_diff(&got, &want) < 1e-4, "{cin}->{cout} up {up}");
            for i in 0..b {
                let xi = x.narrow(0, i, 1).unwrap();
                let one = if up == 1 {
                    conv.forward(&xi)
                } else {
                    conv.forward_upsampled2(&xi)
                }
                .unwrap();
                assert_eq!(
                    one.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    got.narrow(0, i, 1)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                    "image {i} alone differs from the same image in a batch"
                );
            }
        }
    }

    #[test]
    fn upsampled_convolution_matches_upsample_then_convolve() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 6, 7), &dev).unwrap();
        let wt = Tensor::randn(0f32, 1.0, (4, 5, 3, 3), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 4, &dev).unwrap();
        let conv = ConvWeights::new(&wt, Some(&bias), 1, 1).unwrap();
        let want = conv
            .forward(&x.upsample_nearest2d(12, 14).unwrap())
            .unwrap();
        let got = conv.forward_upsampled2(&x).unwrap();
        assert_eq!(got.dims(), &[2, 4, 12, 14]);
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn packed_transposed_convolution_matches_candle() {
        let dev = Device::Cpu;
        for (b, cin, cout, k, stride, pad, h) in [(2, 6, 5, 4, 2, 1, 4), (1, 3, 7, 3, 1, 1, 5)] {
            let x = Tensor::randn(0f32, 1.0, (b, cin, h, h), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (cin, cout, k, k), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
            let want = x
                .conv_transpose2d(&wt, pad, 0, stride, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            let got = ConvTransposeWeights::new(&wt, Some(&bias), stride, pad)
                .unwrap()
                .forward(&x)
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(max_abs_diff(&got, &want) < 1e-4);
        }
    }

    #[test]
    fn mismatched_inputs_are_errors() {
        let dev = Device::Cpu;
        let wt = Tensor::zeros((4, 3, 3, 3), DType::F32, &dev).unwrap();
        let conv = ConvWeights::new(&wt, None, 1, 1).unwrap();
        let x = Tensor::zeros((1, 5, 8, 8), DType::F32, &dev).unwrap();
        assert!(conv
            .forward(&x)
            .unwrap_err()
            .to_string()
            .contains("does not fit"));
        let t = ConvTransposeWeights::new(&wt, None, 2, 1).unwrap();
        assert!(t.forward(&x).unwrap_err().to_string().contains("channels"));
    }
}
