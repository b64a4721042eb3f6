//! Single-precision matrix products `C = A · B (+ C)` with packed operands, on AVX-512,
//! AVX2 + FMA or portable code.
//!
//! `A` (m × k, usually weights) is packed once into micro-panels of [`MR`] rows; `B`
//! (k × n) is packed per call by a [`PanelSource`] straight from where it lives (a matrix,
//! or an image read as im2col columns), block by block, so it never exists unpacked.
//!
//! Every element of `C` is one fused multiply–add chain over `k` in ascending order, cut
//! into blocks of [`KC`] that are written to `C` and read back. Neither the instruction set
//! nor the number of threads nor the position of the element in the matrix changes that
//! chain, so all three give bit-identical results, and a product of one image does not
//! depend on the batch it was computed in.

use rayon::prelude::*;
use std::cell::RefCell;
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// Rows of `A` in one micro-panel (the same on every instruction set, so packed weights
/// serve all of them).
pub const MR: usize = 12;
/// Depth of one block of the reduction.
pub const KC: usize = 256;
/// Columns of `B` packed at once (a block of `KC × NC` values stays in L2).
const NC: usize = 512;
/// Products of fewer multiply–adds than this run on one thread, unless `A` is large.
const SMALL_PRODUCT: usize = 1 << 23;
/// Values of `A` from which a product is split across threads whatever its size: with few
/// columns it is bound by reading `A` from memory, which two cores do twice as fast.
const LARGE_A: usize = 1 << 18;

/// The instruction set the kernels run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simd {
    /// 512-bit vectors (x86-64 with AVX-512F).
    Avx512,
    /// 256-bit vectors with FMA (x86-64 with AVX2 and FMA).
    Avx2,
    /// Plain Rust (any CPU).
    Portable,
}

impl Simd {
    /// Columns of `C` per micro-kernel call.
    fn nr(self) -> usize {
        match self {
            Self::Avx512 => 32,
            Self::Avx2 => 16,
            Self::Portable => 8,
        }
    }

    /// Whether the micro-kernel writes its two column halves through separate pointers
    /// and has a half-width variant.
    fn split_halves(self) -> bool {
        matches!(self, Self::Avx512 | Self::Avx2)
    }

    /// Whether this CPU can run the instruction set.
    pub fn supported(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best instruction set of this CPU.
    pub fn detected() -> Self {
        [Self::Avx512, Self::Avx2]
            .into_iter()
            .find(|s| s.supported())
            .unwrap_or(Self::Portable)
    }

    /// Parses `avx512`, `avx2` or `portable`.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name.to_ascii_lowercase().as_str() {
            "avx512" | "avx-512" => Ok(Self::Avx512),
            "avx2" => Ok(Self::Avx2),
            "portable" | "scalar" => Ok(Self::Portable),
            other => Err(format!(
                "unknown SIMD path {other:?} (avx512, avx2, portable)"
            )),
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::Avx512 => 1,
            Self::Avx2 => 2,
            Self::Portable => 3,
        }
    }
}

/// 0: not chosen yet; otherwise [`Simd::code`].
static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// The instruction set the kernels use: the one set with [`set_simd`], else the one named
/// by `IDIFF_SIMD` (`avx512`, `avx2`, `portable`) when this CPU has it, else the best.
pub fn active_simd() -> Simd {
    match ACTIVE.load(Ordering::Relaxed) {
        1 => Simd::Avx512,
        2 => Simd::Avx2,
        3 => Simd::Portable,
        _ => {
            static FROM_ENV: OnceLock<Simd> = OnceLock::new();
            let s = *FROM_ENV.get_or_init(|| {
                std::env::var("IDIFF_SIMD")
                    .ok()
                    .and_then(|v| Simd::parse(&v).ok())
                    .filter(|s| s.supported())
                    .unwrap_or_else(Simd::detected)
            });
            ACTIVE.store(s.code(), Ordering::Relaxed);
            s
        }
    }
}

/// Makes the kernels use `simd` from now on (process-wide). Every path gives the same bits,
/// so this changes speed only.
pub fn set_simd(simd: Simd) -> Result<(), String> {
    if !simd.supported() {
        return Err(format!("this CPU cannot run the {simd:?} kernels"));
    }
    ACTIVE.store(simd.code(), Ordering::Relaxed);
    Ok(())
}

/// `A` packed into micro-panels: for each depth block, for each panel of [`MR`] rows, the
/// block's columns one after another (`MR` values each; rows past `m` are zero).
#[derive(Debug, Clone)]
pub struct PackedA {
    m: usize,
    k: usize,
    data: Vec<f32>,
}

impl PackedA {
    /// Packs `a[i·rs + p·cs]` for `i < m`, `p < k`.
    pub fn new(a: &[f32], m: usize, k: usize, rs: usize, cs: usize) -> Self {
        assert!(m == 0 || k == 0 || a.len() > (m - 1) * rs + (k - 1) * cs);
        let mp = m.div_ceil(MR) * MR;
        let mut data: Vec<f32> = Vec::with_capacity(mp * k);
        let out = &mut data.spare_capacity_mut()[..mp * k];
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let block = &mut out[k0 * mp..(k0 + kc) * mp];
            for (ip, panel) in block.chunks_exact_mut(kc * MR).enumerate() {
                let rows = MR.min(m - ip * MR);
                // Row by row of the panel (MR consecutive values), padding rows with zeros.
                for (p, dst) in panel.chunks_exact_mut(MR).enumerate() {
                    let col = (k0 + p) * cs;
                    for (i, d) in dst.iter_mut().enumerate() {
                        d.write(if i < rows {
                            a[(ip * MR + i) * rs + col]
                        } else {
                            0.0
                        });
                    }
                }
            }
        }
        // SAFETY: the loops above wrote every one of the `mp · k` values.
        unsafe { data.set_len(mp * k) };
        Self { m, k, data }
    }

    /// Packs an `m × k` matrix given row by row: `row(i, p0, out)` writes
    /// `A[i][p0..p0 + out.len()]` into `out`.
    pub fn from_rows(m: usize, k: usize, row: impl Fn(usize, usize, &mut [f32])) -> Self {
        let mp = m.div_ceil(MR) * MR;
        let mut data = vec![0f32; mp * k];
        let mut rows = vec![0f32; MR * KC.min(k)];
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let block = &mut data[k0 * mp..(k0 + kc) * mp];
            for (ip, panel) in block.chunks_exact_mut(kc * MR).enumerate() {
                let n = MR.min(m - ip * MR);
                for (i, dst) in rows.chunks_exact_mut(kc).take(n).enumerate() {
                    row(ip * MR + i, k0, dst);
                }
                // Rows past `m` stay zero.
                for (p, dst) in panel.chunks_exact_mut(MR).enumerate() {
                    for (i, d) in dst[..n].iter_mut().enumerate() {
                        *d = rows[i * kc + p];
                    }
                }
            }
        }
        Self { m, k, data }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Columns (the reduction depth).
    pub fn depth(&self) -> usize {
        self.k
    }

    /// Element `(i, p)` of the packed matrix.
    pub fn value(&self, i: usize, p: usize) -> f32 {
        assert!(i < self.m && p < self.k, "PackedA::value out of range");
        let mp = self.panels() * MR;
        let k0 = p / KC * KC;
        let kc = KC.min(self.k - k0);
        self.data[k0 * mp + (i / MR) * kc * MR + (p - k0) * MR + i % MR]
    }

    fn panels(&self) -> usize {
        self.m.div_ceil(MR)
    }

    /// The micro-panel `ip` of the depth block starting at `k0` (`kc` deep).
    fn panel(&self, k0: usize, kc: usize, ip: usize) -> &[f32] {
        let mp = self.panels() * MR;
        &self.data[k0 * mp + ip * kc * MR..][..kc * MR]
    }
}

/// Something that can write blocks of `B` (k × n) in packed form.
pub trait PanelSource: Sync {
    /// Writes rows `k0..k0 + kc` and columns `n0..n0 + len` into `out` as panels of `nr`
    /// columns: panel `j` at `j·kc·nr`, row `p` of it at `+ p·nr`; columns past `len` zero.
    fn pack(&self, k0: usize, kc: usize, n0: usize, len: usize, nr: usize, out: &mut [f32]);

    /// The same block when the source already stores it packed (then nothing is copied).
    fn prepacked(&self, _k0: usize, _kc: usize, _n0: usize, _nr: usize) -> Option<&[f32]> {
        None
    }
}

/// Where each element of a `k × n` matrix `B` goes when it is stored in the order the
/// product reads it ([`Prepacked`]): slices of `NC` columns, in each, blocks of `KC` rows,
/// in each, panels of `nr` columns (`kc × nr`, columns past `n` unused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedLayout {
    k: usize,
    n: usize,
    nr: usize,
}

impl PackedLayout {
    /// The layout of a `k × n` matrix for the active instruction set.
    pub fn new(k: usize, n: usize) -> Self {
        Self {
            k,
            n,
            nr: active_simd().nr(),
        }
    }

    /// Values the stored matrix takes.
    pub fn len(&self) -> usize {
        let full = self.n / NC * NC;
        full * self.k + (self.n - full).div_ceil(self.nr) * self.nr * self.k
    }

    /// True for an empty matrix.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Panel width: columns `j..j + run` with `run ≤ nr − j % nr` are contiguous.
    pub fn nr(&self) -> usize {
        self.nr
    }

    /// Offset of element `(p, j)`.
    #[inline]
    pub fn offset(&self, p: usize, j: usize) -> usize {
        let s0 = j / NC * NC;
        let width = (self.n - s0).min(NC).div_ceil(self.nr) * self.nr;
        let k0 = p / KC * KC;
        let kc = KC.min(self.k - k0);
        let jj = j - s0;
        s0 * self.k + k0 * width + (jj / self.nr) * kc * self.nr + (p - k0) * self.nr + jj % self.nr
    }
}

/// A matrix stored in a [`PackedLayout`] (for the instruction set active when it was
/// written).
#[derive(Debug, Clone, Copy)]
pub struct Prepacked<'a> {
    /// The layout.
    pub layout: PackedLayout,
    /// `layout.len()` values.
    pub data: &'a [f32],
}

impl PanelSource for Prepacked<'_> {
    fn pack(&self, k0: usize, kc: usize, n0: usize, len: usize, nr: usize, out: &mut [f32]) {
        for (jp, panel) in out[..len.div_ceil(nr) * kc * nr]
            .chunks_exact_mut(kc * nr)
            .enumerate()
        {
            for p in 0..kc {
                for jj in 0..nr {
                    let j = n0 + jp * nr + jj;
                    panel[p * nr + jj] = if j < n0 + len {
                        self.data[self.layout.offset(k0 + p, j)]
                    } else {
                        0.0
                    };
                }
            }
        }
    }

    fn prepacked(&self, k0: usize, kc: usize, n0: usize, nr: usize) -> Option<&[f32]> {
        if nr != self.layout.nr || !n0.is_multiple_of(NC) || !k0.is_multiple_of(KC) {
            return None;
        }
        let width = (self.layout.n - n0).min(NC).div_ceil(nr) * nr;
        let start = n0 * self.layout.k + k0 * width;
        Some(&self.data[start..start + kc * width])
    }
}

/// A dense matrix: element `(p, j)` at `(j / group)·group_stride + p·rs + (j % group)·cs`.
/// Groups of columns let a batch of images, each a `k × pixels` matrix, act as one wide
/// `k × (batch·pixels)` matrix.
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a> {
    /// The values.
    pub data: &'a [f32],
    /// Row stride.
    pub rs: usize,
    /// Column stride within a group.
    pub cs: usize,
    /// Columns per group.
    pub group: usize,
    /// Distance between groups.
    pub group_stride: usize,
}

impl<'a> Matrix<'a> {
    /// A matrix `data[p·rs + j·cs]`.
    pub fn new(data: &'a [f32], rs: usize, cs: usize) -> Self {
        Self {
            data,
            rs,
            cs,
            group: usize::MAX,
            group_stride: 0,
        }
    }

    /// A batch of row-major `rows × cols` matrices side by side (`rows × batch·cols`).
    pub fn batch(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rs: cols,
            cs: 1,
            group: cols.max(1),
            group_stride: rows * cols,
        }
    }

    #[inline]
    fn column(&self, j: usize) -> usize {
        (j / self.group) * self.group_stride + (j % self.group) * self.cs
    }
}

impl PanelSource for Matrix<'_> {
    fn pack(&self, k0: usize, kc: usize, n0: usize, len: usize, nr: usize, out: &mut [f32]) {
        for (jp, panel) in out[..len.div_ceil(nr) * kc * nr]
            .chunks_exact_mut(kc * nr)
            .enumerate()
        {
            let j0 = n0 + jp * nr;
            let w = nr.min(n0 + len - j0);
            if self.cs == 1 {
                let (mut d, mut j) = (0, j0);
                while d < w {
                    let run = (self.group - j % self.group).min(w - d);
                    let base = self.column(j) + k0 * self.rs;
                    for p in 0..kc {
                        let src = &self.data[base + p * self.rs..][..run];
                        panel[p * nr + d..p * nr + d + run].copy_from_slice(src);
                    }
                    d += run;
                    j += run;
                }
                if w < nr {
                    for p in 0..kc {
                        panel[p * nr + w..(p + 1) * nr].fill(0.0);
                    }
                }
            } else {
                // Read each column along its rows.
                if w < nr {
                    panel.fill(0.0);
                }
                for j in 0..w {
                    let col = &self.data[self.column(j0 + j) + k0 * self.rs..];
                    for p in 0..kc {
                        panel[p * nr + j] = col[p * self.rs];
                    }
                }
            }
        }
    }
}

/// Where the product goes: element `(i, j)` at
/// `(j / group)·group_stride + i·rs + (j % group)·cs` of the values it borrows.
#[derive(Debug)]
pub struct Output<'a> {
    ptr: *mut f32,
    len: usize,
    /// Whether every element holds a value (otherwise the product may only overwrite).
    filled: bool,
    /// Row stride.
    pub rs: usize,
    /// Column stride within a group.
    pub cs: usize,
    /// Columns per group.
    pub group: usize,
    /// Distance between groups.
    pub group_stride: usize,
    _data: PhantomData<&'a mut [f32]>,
}

impl<'a> Output<'a> {
    fn over(data: &'a mut [f32], rs: usize, cs: usize, group: usize, group_stride: usize) -> Self {
        Self {
            ptr: data.as_mut_ptr(),
            len: data.len(),
            filled: true,
            rs,
            cs,
            group,
            group_stride,
            _data: PhantomData,
        }
    }

    /// A row-major matrix with row stride `ldc`.
    pub fn new(data: &'a mut [f32], ldc: usize) -> Self {
        Self::over(data, ldc, 1, usize::MAX, 0)
    }

    /// A batch of row-major `rows × cols` matrices, one per group of `cols` columns.
    pub fn batch(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::over(data, cols, 1, cols.max(1), rows * cols)
    }

    /// [`Output::batch`] over memory not yet filled: a product that does not accumulate
    /// writes every element of it.
    pub fn batch_unfilled(data: &'a mut [MaybeUninit<f32>], rows: usize, cols: usize) -> Self {
        Self {
            ptr: data.as_mut_ptr() as *mut f32,
            len: data.len(),
            filled: false,
            rs: cols,
            cs: 1,
            group: cols.max(1),
            group_stride: rows * cols,
            _data: PhantomData,
        }
    }

    /// The transpose of a row-major `cols × rows` matrix (row `j` holds column `j`).
    pub fn transposed(data: &'a mut [f32], rows: usize) -> Self {
        Self::over(data, 1, rows, usize::MAX, 0)
    }

    fn offset(&self, i: usize, j: usize) -> usize {
        (j / self.group) * self.group_stride + i * self.rs + (j % self.group) * self.cs
    }
}

/// [`Output`] as a raw pointer, shared by the threads of one product.
#[derive(Clone, Copy)]
struct RawOutput {
    ptr: usize,
    rs: usize,
    cs: usize,
    group: usize,
    group_stride: usize,
}

impl RawOutput {
    /// Offset of column `j` in row 0.
    #[inline]
    fn column(&self, j: usize) -> usize {
        (j / self.group) * self.group_stride + (j % self.group) * self.cs
    }

    #[inline]
    fn at(&self, i: usize, j: usize) -> *mut f32 {
        (self.ptr as *mut f32).wrapping_add(self.column(j) + i * self.rs)
    }
}

thread_local! {
    /// Per-thread buffer for packed blocks of `B`.
    static PACKED_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per-thread buffer for a whole `B` packed before a product split by rows.
    static SHARED_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Largest `B` (in values) packed once for all threads of a product split by rows.
const SHARED_B_MAX: usize = 1 << 22;

/// Packs all of `b` (`k × n`) into `buf` in the layout of [`Prepacked`], blocks side by side
/// on `threads` threads.
fn pack_whole(
    b: &dyn PanelSource,
    k: usize,
    n: usize,
    nr: usize,
    buf: &mut Vec<f32>,
) -> PackedLayout {
    let layout = PackedLayout { k, n, nr };
    if buf.len() < layout.len() {
        buf.resize(layout.len(), 0.0);
    }
    let mut blocks = Vec::new();
    let mut rest = &mut buf[..layout.len()];
    for s0 in (0..n).step_by(NC) {
        let len = NC.min(n - s0);
        let width = len.div_ceil(nr) * nr;
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let (block, tail) = std::mem::take(&mut rest).split_at_mut(kc * width);
            blocks.push((k0, kc, s0, len, block));
            rest = tail;
        }
    }
    blocks
        .par_iter_mut()
        .for_each(|(k0, kc, s0, len, block)| b.pack(*k0, *kc, *s0, *len, nr, block));
    layout
}

thread_local! {
    /// Whether this rayon worker runs a serial chain of ops (see [`on_pool`]).
    static LEADS_POOL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// How many threads a kernel may use: all of rayon's when called from outside its pool or
/// from the worker running [`on_pool`], one on other workers (the caller already runs in
/// parallel, e.g. over a batch).
pub fn kernel_threads() -> usize {
    if rayon::current_thread_index().is_some() && !LEADS_POOL.get() {
        1
    } else {
        rayon::current_num_threads()
    }
}

/// Runs `f`, a chain of ops that follow one another, on a rayon worker whose kernels still
/// use every thread of the pool: their parallel loops then start from inside the pool
/// (no wake-up from outside per op). Results do not depend on the number of threads.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| leading_pool(true, f))
}

/// Runs `f` with one thread per kernel (see [`kernel_threads`]) on this rayon worker, also
/// when it leads the pool: for work that already runs in parallel parts.
pub fn one_thread_per_kernel<R>(f: impl FnOnce() -> R) -> R {
    leading_pool(false, f)
}

/// Runs `f` with this thread marked as leading the pool or not, then restores the mark.
fn leading_pool<R>(leads: bool, f: impl FnOnce() -> R) -> R {
    let previous = LEADS_POOL.replace(leads);
    let out = f();
    LEADS_POOL.set(previous);
    out
}

/// `C = A · B` (or `C += A · B` with `accumulate`), then `C[i][·] += bias[i]`, for the
/// `m × n` matrix `C` in `c`. Uses up to `threads` threads.
pub fn gemm(
    a: &PackedA,
    b: &dyn PanelSource,
    n: usize,
    c: Output,
    accumulate: bool,
    bias: Option<&[f32]>,
    threads: usize,
) {
    gemm_with(active_simd(), a, b, n, c, accumulate, bias, threads)
}

/// [`gemm`] on a given instruction set (which must be [`Simd::supported`]).
#[allow(clippy::too_many_arguments)]
pub fn gemm_with(
    simd: Simd,
    a: &PackedA,
    b: &dyn PanelSource,
    n: usize,
    c: Output,
    accumulate: bool,
    bias: Option<&[f32]>,
    threads: usize,
) {
    let m = a.m;
    if m == 0 || n == 0 {
        return;
    }
    let last = c
        .offset(m - 1, n - 1)
        .max(c.offset(0, n - 1))
        .max(c.offset(m - 1, 0));
    assert!(last < c.len, "gemm: C too small");
    assert!(
        c.filled || !accumulate,
        "gemm: cannot accumulate into unfilled memory"
    );
    assert!(simd.supported(), "gemm: {simd:?} is not supported here");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), m, "gemm: bias length");
    }
    let nr = simd.nr();
    let n_panels = n.div_ceil(nr);
    let m_panels = a.panels();
    // Small products are not worth waking another thread for.
    let threads = if m * n * a.k < SMALL_PRODUCT && m * a.k < LARGE_A {
        1
    } else {
        threads.max(1)
    };
    // Tasks: column ranges (in panels) × row-panel ranges, disjoint regions of C.
    // Each thread reads all of the operand that is not split: split the larger one's
    // partner, i.e. the rows (of `A`) when `A` is larger than `B`.
    let (n_parts, m_parts) = if threads == 1 {
        (1, 1)
    } else if n_panels >= threads && (m <= n || m_panels < threads) {
        (threads.min(n_panels), 1)
    } else {
        (1, threads.min(m_panels))
    };
    let tasks: Vec<(usize, usize, usize, usize)> = (0..n_parts)
        .flat_map(|jn| {
            let (j0, j1) = (n_panels * jn / n_parts, n_panels * (jn + 1) / n_parts);
            (0..m_parts).map(move |im| {
                let (i0, i1) = (m_panels * im / m_parts, m_panels * (im + 1) / m_parts);
                (j0 * nr, (j1 * nr).min(n), i0, i1)
            })
        })
        .filter(|&(n0, n1, i0, i1)| n0 < n1 && i0 < i1)
        .collect();
    let out = RawOutput {
        ptr: c.ptr as usize,
        rs: c.rs,
        cs: c.cs,
        group: c.group,
        group_stride: c.group_stride,
    };
    let run = |b: &dyn PanelSource| {
        let one = |&(n0, n1, i0, i1): &(usize, usize, usize, usize)| {
            // SAFETY: tasks cover disjoint rows × columns of C, inside its bounds (asserted
            // for the extreme corners; the strides are monotone).
            unsafe { gemm_region(simd, a, b, n0, n1, i0, i1, out, accumulate, bias) }
        };
        if tasks.len() > 1 {
            tasks.par_iter().for_each(one);
        } else {
            tasks.iter().for_each(one);
        }
    };
    // Threads that share the columns would each pack all of `B`: pack it once instead.
    let k = a.k;
    if m_parts > 1 && k > 0 && b.prepacked(0, KC.min(k), 0, nr).is_none() && k * n <= SHARED_B_MAX {
        super::with_thread_buffer(&SHARED_B, |buf| {
            let layout = pack_whole(b, k, n, nr, buf);
            run(&Prepacked {
                layout,
                data: &buf[..layout.len()],
            });
        });
    } else {
        run(b);
    }
}

/// Computes rows of panels `i0..i1` and columns `n0..n1` of `C`.
///
/// # Safety
/// `c` must address the whole product, of which this call alone touches the region.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_region(
    simd: Simd,
    a: &PackedA,
    b: &dyn PanelSource,
    n0: usize,
    n1: usize,
    i0: usize,
    i1: usize,
    c: RawOutput,
    accumulate: bool,
    bias: Option<&[f32]>,
) {
    let nr = simd.nr();
    let (m, k) = (a.m, a.k);
    super::with_thread_buffer(&PACKED_B, |buf| {
        let need = KC * NC.div_ceil(nr) * nr;
        if buf.len() < need {
            buf.resize(need, 0.0);
        }
        for s0 in (n0..n1).step_by(NC) {
            let len = NC.min(n1 - s0);
            for k0 in (0..k.max(1)).step_by(KC) {
                let kc = KC.min(k - k0);
                let load_c = accumulate || k0 > 0;
                let last = k0 + kc >= k;
                let block: &[f32] = match b.prepacked(k0, kc, s0, nr) {
                    Some(block) => block,
                    None => {
                        if kc > 0 {
                            b.pack(k0, kc, s0, len, nr, buf);
                        }
                        buf
                    }
                };
                for (jp, j0) in (s0..s0 + len).step_by(nr).enumerate() {
                    let w = nr.min(s0 + len - j0);
                    let bp = &block[jp * kc * nr..][..kc * nr];
                    // A full-width tile whose halves each lie inside one group is computed
                    // in place (its first `h` rows); any other is gathered into a buffer and
                    // scattered back.
                    let half = nr / 2;
                    // A tile of at most half the width (a small image at batch 1) runs a
                    // half-width kernel instead of computing padding columns.
                    let narrow = simd.split_halves() && w <= half;
                    let in_place = c.cs == 1
                        && if narrow {
                            w == half && j0 / c.group == (j0 + half - 1) / c.group
                        } else if simd.split_halves() {
                            w == nr
                                && j0 / c.group == (j0 + half - 1) / c.group
                                && (j0 + half) / c.group == (j0 + nr - 1) / c.group
                        } else {
                            w == nr && j0 / c.group == (j0 + nr - 1) / c.group
                        };
                    for ip in i0..i1 {
                        let h = MR.min(m - ip * MR);
                        let ap = a.panel(k0, kc, ip);
                        let bias = bias.filter(|_| last).map(|b| &b[ip * MR..ip * MR + h]);
                        if in_place {
                            let c0 = c.at(ip * MR, j0);
                            let parts = if narrow {
                                narrow_kernel(simd, kc, ap, bp, c0, c.rs, load_c, h);
                                [Some(c0), None]
                            } else {
                                let c1 = c.at(ip * MR, j0 + half);
                                kernel(simd, kc, ap, bp, (c0, c1), c.rs, load_c, h);
                                [Some(c0), Some(c1)]
                            };
                            for (i, &v) in bias.into_iter().flatten().enumerate() {
                                for part in parts.into_iter().flatten() {
                                    std::slice::from_raw_parts_mut(part.add(i * c.rs), half)
                                        .iter_mut()
                                        .for_each(|x| *x += v);
                                }
                            }
                        } else {
                            let tile = Tile {
                                i0: ip * MR,
                                j0,
                                h,
                                w,
                                narrow,
                            };
                            scattered_tile(simd, kc, ap, bp, c, tile, load_c, bias);
                        }
                    }
                }
            }
        }
    });
}

/// The micro-kernel of `simd` on the first `rows` rows of an `MR × nr` tile whose columns
/// `0..nr/2` start at `c.0` and `nr/2..nr` at `c.1` (row stride `ldc`; in portable code
/// `c.1` must be `c.0 + nr/2`).
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn kernel(
    simd: Simd,
    kc: usize,
    ap: &[f32],
    bp: &[f32],
    c: (*mut f32, *mut f32),
    ldc: usize,
    load_c: bool,
    rows: usize,
) {
    match simd {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => x86::kernel_avx512(kc, ap.as_ptr(), bp.as_ptr(), c, ldc, load_c, rows),
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => x86::kernel_avx2(kc, ap.as_ptr(), bp.as_ptr(), c, ldc, load_c, rows),
        _ => kernel_portable(kc, ap, bp, c.0, ldc, load_c, rows),
    }
}

/// The half-width kernel of `simd` (16 columns on AVX-512, 8 on AVX2) on a tile of a packed
/// panel of full width.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn narrow_kernel(
    simd: Simd,
    kc: usize,
    ap: &[f32],
    bp: &[f32],
    c: *mut f32,
    ldc: usize,
    load_c: bool,
    rows: usize,
) {
    match simd {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => {
            x86::kernel_avx512_narrow(kc, ap.as_ptr(), bp.as_ptr(), c, ldc, load_c, rows)
        }
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => x86::kernel_avx2_narrow(kc, ap.as_ptr(), bp.as_ptr(), c, ldc, load_c, rows),
        _ => unreachable!("no half-width kernel for {simd:?}"),
    }
}

/// Where a tile of `C` lies: rows `i0..i0 + h`, columns `j0..j0 + w`, and whether it runs
/// the half-width kernel.
#[derive(Clone, Copy)]
struct Tile {
    i0: usize,
    j0: usize,
    h: usize,
    w: usize,
    narrow: bool,
}

/// A partial tile, or one whose columns are not contiguous in `C` (strided, or across
/// groups): gathered into a buffer, computed there and scattered back.
#[allow(clippy::too_many_arguments)]
unsafe fn scattered_tile(
    simd: Simd,
    kc: usize,
    ap: &[f32],
    bp: &[f32],
    c: RawOutput,
    Tile {
        i0,
        j0,
        h,
        w,
        narrow,
    }: Tile,
    load_c: bool,
    bias: Option<&[f32]>,
) {
    let nr = simd.nr();
    let mut buf = [0f32; MR * 32];
    let base = c.ptr as *mut f32;
    // Adjacent columns (a partial tile) move as whole row pieces, others one by one.
    let adjacent = c.cs == 1 && j0 / c.group == (j0 + w - 1) / c.group;
    let mut cols = [0usize; 32];
    if adjacent {
        cols[0] = c.column(j0);
    } else {
        for (j, col) in cols.iter_mut().enumerate().take(w) {
            *col = c.column(j0 + j);
        }
    }
    let row = |i: usize| base.add((i0 + i) * c.rs);
    if load_c {
        for i in 0..h {
            let dst = &mut buf[i * nr..i * nr + w];
            if adjacent {
                dst.copy_from_slice(std::slice::from_raw_parts(row(i).add(cols[0]), w));
            } else {
                for (d, &col) in dst.iter_mut().zip(&cols) {
                    *d = *row(i).add(col);
                }
            }
        }
    }
    let tile = buf.as_mut_ptr();
    if narrow {
        narrow_kernel(simd, kc, ap, bp, tile, nr, load_c, MR);
    } else {
        kernel(simd, kc, ap, bp, (tile, tile.add(nr / 2)), nr, load_c, MR);
    }
    for i in 0..h {
        let src = &buf[i * nr..i * nr + w];
        let v = bias.map(|b| b[i]);
        if adjacent {
            let dst = std::slice::from_raw_parts_mut(row(i).add(cols[0]), w);
            match v {
                Some(v) => dst.iter_mut().zip(src).for_each(|(d, &x)| *d = x + v),
                None => dst.copy_from_slice(src),
            }
        } else {
            for (&x, &col) in src.iter().zip(&cols) {
                *row(i).add(col) = match v {
                    Some(v) => x + v,
                    None => x,
                };
            }
        }
    }
}

/// `MR × 8` tile with scalar fused multiply–adds (the same chain as the vector kernels).
unsafe fn kernel_portable(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    load_c: bool,
    rows: usize,
) {
    const NR: usize = 8;
    let mut acc = [[0f32; NR]; MR];
    if load_c {
        for (i, row) in acc.iter_mut().enumerate().take(rows) {
            for (j, v) in row.iter_mut().enumerate() {
                *v = *c.add(i * ldc + j);
            }
        }
    }
    for p in 0..kc {
        let bv = &b[p * NR..(p + 1) * NR];
        for (i, row) in acc.iter_mut().enumerate() {
            let av = a[p * MR + i];
            for (v, &bj) in row.iter_mut().zip(bv) {
                *v = av.mul_add(bj, *v);
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(rows) {
        for (j, v) in row.iter().enumerate() {
            *c.add(i * ldc + j) = *v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::MR;
    use std::arch::x86_64::*;

    /// `MR × 32` tile (its first `rows` rows; the two halves of 16 columns may lie apart):
    /// 24 accumulators of 16 lanes.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel_avx512(
        kc: usize,
        a: *const f32,
        b: *const f32,
        (c0, c1): (*mut f32, *mut f32),
        ldc: usize,
        load_c: bool,
        rows: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        if load_c {
            for (i, row) in acc.iter_mut().enumerate() {
                if i < rows {
                    row[0] = _mm512_loadu_ps(c0.add(i * ldc));
                    row[1] = _mm512_loadu_ps(c1.add(i * ldc));
                }
            }
        }
        for p in 0..kc {
            let b0 = _mm512_loadu_ps(b.add(p * 32));
            let b1 = _mm512_loadu_ps(b.add(p * 32 + 16));
            let ap = a.add(p * MR);
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*ap.add(i));
                row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
                row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            if i < rows {
                _mm512_storeu_ps(c0.add(i * ldc), row[0]);
                _mm512_storeu_ps(c1.add(i * ldc), row[1]);
            }
        }
    }

    /// `MR × 16` tile (its first `rows` rows) of a packed panel of 32 columns: 12
    /// accumulators of 16 lanes, the same chains as [`kernel_avx512`]'s.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel_avx512_narrow(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        load_c: bool,
        rows: usize,
    ) {
        let mut acc = [_mm512_setzero_ps(); MR];
        if load_c {
            for (i, v) in acc.iter_mut().enumerate() {
                if i < rows {
                    *v = _mm512_loadu_ps(c.add(i * ldc));
                }
            }
        }
        for p in 0..kc {
            let b0 = _mm512_loadu_ps(b.add(p * 32));
            let ap = a.add(p * MR);
            for (i, v) in acc.iter_mut().enumerate() {
                *v = _mm512_fmadd_ps(_mm512_set1_ps(*ap.add(i)), b0, *v);
            }
        }
        for (i, v) in acc.iter().enumerate() {
            if i < rows {
                _mm512_storeu_ps(c.add(i * ldc), *v);
            }
        }
    }

    /// `MR × 16` tile (its first `rows` rows; the two halves of 8 columns may lie apart),
    /// computed as two passes of 6 rows × 16 columns: 12 accumulators of 8 lanes each, so
    /// every step loads two vectors of `B` and broadcasts 6 values of `A` for 12 FMAs.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel_avx2(
        kc: usize,
        a: *const f32,
        b: *const f32,
        (c0, c1): (*mut f32, *mut f32),
        ldc: usize,
        load_c: bool,
        rows: usize,
    ) {
        const HALF: usize = MR / 2;
        for r0 in (0..rows).step_by(HALF) {
            let n = HALF.min(rows - r0);
            let mut acc = [[_mm256_setzero_ps(); 2]; HALF];
            if load_c {
                for (i, row) in acc.iter_mut().enumerate().take(n) {
                    row[0] = _mm256_loadu_ps(c0.add((r0 + i) * ldc));
                    row[1] = _mm256_loadu_ps(c1.add((r0 + i) * ldc));
                }
            }
            let a = a.add(r0);
            for p in 0..kc {
                let b0 = _mm256_loadu_ps(b.add(p * 16));
                let b1 = _mm256_loadu_ps(b.add(p * 16 + 8));
                let ap = a.add(p * MR);
                for (i, row) in acc.iter_mut().enumerate() {
                    let ai = _mm256_set1_ps(*ap.add(i));
                    row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
                    row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
                }
            }
            for (i, row) in acc.iter().enumerate().take(n) {
                _mm256_storeu_ps(c0.add((r0 + i) * ldc), row[0]);
                _mm256_storeu_ps(c1.add((r0 + i) * ldc), row[1]);
            }
        }
    }

    /// `MR × 8` tile (its first `rows` rows) of a packed panel of 16 columns: 12
    /// accumulators of 8 lanes, the same chains as [`kernel_avx2`]'s.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel_avx2_narrow(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        load_c: bool,
        rows: usize,
    ) {
        let mut acc = [_mm256_setzero_ps(); MR];
        if load_c {
            for (i, v) in acc.iter_mut().enumerate() {
                if i < rows {
                    *v = _mm256_loadu_ps(c.add(i * ldc));
                }
            }
        }
        for p in 0..kc {
            let b0 = _mm256_loadu_ps(b.add(p * 16));
            let ap = a.add(p * MR);
            for (i, v) in acc.iter_mut().enumerate() {
                *v = _mm256_fmadd_ps(_mm256_set1_ps(*ap.add(i)), b0, *v);
            }
        }
        for (i, v) in acc.iter().enumerate() {
            if i < rows {
                _mm256_storeu_ps(c.add(i * ldc), *v);
            }
        }
    }
}

/// `dst (m × n, row-major) = [dst +] a (m × k) · b (k × n)` for matrices given by strides,
/// packing `a` on the fly (for operands that change every call).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..(m - 1) * n + n].fill(0.0);
        }
        return;
    }
    let packed = PackedA::new(a, m, k, a_rs, a_cs);
    let source = Matrix::new(b, b_rs, b_cs);
    gemm(
        &packed,
        &source,
        n,
        Output::new(dst, n),
        accumulate,
        None,
        threads,
    );
}

/// GFLOP/s of an `n × n × n` product on `threads` threads with `simd` (best of `repeats`,
/// after one warm-up): the attainable peak that benchmarks compare against.
pub fn large_gemm_gflops(simd: Simd, n: usize, threads: usize, repeats: usize) -> f64 {
    let a: Vec<f32> = (0..n * n)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
        .collect();
    let b: Vec<f32> = (0..n * n)
        .map(|i| ((i * 5 % 11) as f32 - 5.0) / 8.0)
        .collect();
    let packed = PackedA::new(&a, n, n, n, 1);
    let src = Matrix::new(&b, n, 1);
    let mut c = vec![0f32; n * n];
    let mut best = f64::INFINITY;
    for i in 0..=repeats.max(1) {
        let start = std::time::Instant::now();
        gemm_with(
            simd,
            &packed,
            &src,
            n,
            Output::new(&mut c, n),
            false,
            None,
            threads,
        );
        if i > 0 {
            best = best.min(start.elapsed().as_secs_f64());
        }
    }
    2.0 * (n as f64).powi(3) / best / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                    .sum();
            }
        }
        c
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// A matrix stored in the product's own layout (read in place with one thread, copied
    /// per block with several, whose blocks start off the slice boundaries) gives the same
    /// bits as the plain matrix, across several column slices and depth blocks.
    /// Workers run kernels on one thread, except the one running `on_pool` (restored after).
    #[test]
    fn on_pool_lets_its_worker_use_every_thread() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            assert_eq!(kernel_threads(), 1);
            assert_eq!(on_pool(kernel_threads), 2);
            assert_eq!(kernel_threads(), 1);
        });
    }

    #[test]
    fn prepacked_matrices_give_the_plain_product() {
        let (m, n, k) = (13, NC + 45, KC + 7);
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        let packed = PackedA::new(&a, m, k, k, 1);
        let layout = PackedLayout::new(k, n);
        let mut stored = vec![f32::NAN; layout.len()];
        for p in 0..k {
            for j in 0..n {
                stored[layout.offset(p, j)] = b[p * n + j];
            }
        }
        let mut want = vec![0f32; m * n];
        gemm(
            &packed,
            &Matrix::new(&b, n, 1),
            n,
            Output::new(&mut want, n),
            false,
            None,
            1,
        );
        for threads in [1, 2] {
            let src = Prepacked {
                layout,
                data: &stored,
            };
            let mut got = vec![0f32; m * n];
            gemm(
                &packed,
                &src,
                n,
                Output::new(&mut got, n),
                false,
                None,
                threads,
            );
            assert_eq!(got, want, "{threads} threads");
        }
    }

    /// Every instruction set of this CPU and every thread count gives the same bits, and
    /// they agree with a double-precision product (edges, several depth blocks, bias,
    /// accumulation, a transposed `B`).
    #[test]
    fn every_path_gives_the_same_bits_and_the_right_product() {
        let paths: Vec<Simd> = [Simd::Avx512, Simd::Avx2, Simd::Portable]
            .into_iter()
            .filter(|s| s.supported())
            .collect();
        for &(m, n, k) in &[
            (1, 1, 1),
            (12, 32, 7),
            (13, 33, 300),
            (37, 70, 513),
            (5, 600, 20),
            // Half-width tiles: a whole product of 16 columns, and 16 after a full tile.
            (13, 16, 300),
            (25, 48, 33),
            // More rows than columns: split by rows, `B` packed once for all threads.
            (100, 70, 300),
        ] {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let bias = values(m, 3);
            let start = values(m * n, 4);
            let want = naive(m, n, k, &a, &b);
            let packed = PackedA::new(&a, m, k, k, 1);
            let mut first: Option<Vec<f32>> = None;
            for &simd in &paths {
                for threads in [1, 2, 3] {
                    for transposed in [false, true] {
                        let src = if transposed {
                            Matrix::new(&bt, 1, k)
                        } else {
                            Matrix::new(&b, n, 1)
                        };
                        let mut c = start.clone();
                        let out = Output::new(&mut c, n);
                        gemm_with(simd, &packed, &src, n, out, true, Some(&bias), threads);
                        for i in 0..m {
                            for j in 0..n {
                                let w = want[i * n + j] + start[i * n + j] as f64 + bias[i] as f64;
                                let got = c[i * n + j] as f64;
                                assert!(
                                    (got - w).abs() < 1e-4 * (1.0 + k as f64).sqrt(),
                                    "{simd:?} {m}x{n}x{k} [{i},{j}]: {got} vs {w}"
                                );
                            }
                        }
                        match &first {
                            None => first = Some(c),
                            Some(f) => assert!(
                                f.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()),
                                "{simd:?}, {threads} threads, transposed {transposed}: bits differ for {m}x{n}x{k}"
                            ),
                        }
                    }
                }
            }
        }
    }

    /// A batch of matrices side by side (grouped columns in and out) and a transposed
    /// output give each image's own product, bit for bit.
    #[test]
    fn grouped_and_transposed_outputs_hold_each_images_product() {
        // Column counts that put tiles across images, whole or split at half width.
        for cols in [7, 16, 48] {
            let (m, k, batch) = (13, 40, 3);
            let bias = values(m, 7);
            let a = values(m * k, 5);
            let x = values(batch * k * cols, 6);
            let packed = PackedA::new(&a, m, k, k, 1);
            let mut together = vec![0f32; batch * m * cols];
            let out = Output::batch(&mut together, m, cols);
            gemm(
                &packed,
                &Matrix::batch(&x, k, cols),
                batch * cols,
                out,
                false,
                Some(&bias),
                2,
            );
            for b in 0..batch {
                let mut alone = vec![0f32; m * cols];
                let src = Matrix::new(&x[b * k * cols..(b + 1) * k * cols], cols, 1);
                gemm(
                    &packed,
                    &src,
                    cols,
                    Output::new(&mut alone, cols),
                    false,
                    Some(&bias),
                    1,
                );
                assert_eq!(alone, together[b * m * cols..(b + 1) * m * cols]);
                // The transpose: row j of `t` is column j of the product.
                let mut t = vec![0f32; cols * m];
                gemm(
                    &packed,
                    &src,
                    cols,
                    Output::transposed(&mut t, m),
                    false,
                    Some(&bias),
                    1,
                );
                for i in 0..m {
                    for j in 0..cols {
                        assert_eq!(t[j * m + i].to_bits(), alone[i * cols + j].to_bits());
                    }
                }
            }
        }
    }

    #[test]
    fn unsupported_paths_are_refused_by_name() {
        assert!(Simd::parse("avx3").unwrap_err().contains("avx3"));
        assert_eq!(Simd::parse("AVX2"), Ok(Simd::Avx2));
        assert!(Simd::Portable.supported());
    }
}
