//! Multi-head attention on `(C, N)` sequences for inference, as packed matrix products:
//! 1×1 projections `q, k, v`, per head the scores `qᵀk` (both pre-scaled by `d^(−1/4)`), a
//! row softmax in place, `v · wᵀ`, and the output projection — no transposed copies.

use super::gemm::{gemm, kernel_threads, Matrix, Output, PackedA};
use super::linear::LinearWeights;
use super::math::softmax_columns;
use super::{f32_values, written};
use candle_core::{CpuStorage, CustomOp2, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::convert::Infallible;
use std::mem::MaybeUninit;

/// Multiply–adds of the score and mixing products below which the heads run on one thread.
const PARALLEL_WORK: usize = 1 << 22;

/// The packed weights of one attention layer (`to_q`, `to_k`, `to_v`, `proj_out`).
#[derive(Debug, Clone)]
pub struct AttentionWeights {
    q: LinearWeights,
    k: LinearWeights,
    v: LinearWeights,
    out: LinearWeights,
    heads: usize,
}

/// `(weight, bias)` of a 1×1 projection.
pub type ProjectionParams<'a> = (&'a Tensor, &'a Tensor);

impl AttentionWeights {
    /// Packs the four projections (weights `[out, in]` or `[out, in, 1]`).
    pub fn new(
        q: ProjectionParams,
        k: ProjectionParams,
        v: ProjectionParams,
        out: ProjectionParams,
        heads: usize,
    ) -> Result<Self> {
        let this = Self {
            q: LinearWeights::new(q.0, Some(q.1))?,
            k: LinearWeights::new(k.0, Some(k.1))?,
            v: LinearWeights::new(v.0, Some(v.1))?,
            out: LinearWeights::new(out.0, Some(out.1))?,
            heads,
        };
        let c = this.q.out_features();
        if heads == 0
            || !c.is_multiple_of(heads)
            || this.k.out_features() != c
            || this.v.out_features() != c
            || this.out.out_features() != c
            || this.out.in_features() != c
            || this.q.in_features() != c
            || this.k.in_features() != this.v.in_features()
        {
            return Err(Error::Msg(format!(
                "attention: projections do not fit {c} channels in {heads} heads"
            )));
        }
        Ok(this)
    }

    /// `x (B, C, Nq)`, `kv (B, Ckv, Nk)` (F32, CPU) → `(B, C, Nq)`.
    pub fn forward(&self, x: &Tensor, kv: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op2_no_bwd(&kv.contiguous()?, self)
    }

    /// A batch: `x (batch, C, nq)`, `kv (batch, Ckv, nk)` → `(batch, C, nq)`.
    fn batch(&self, x: &[f32], kv: &[f32], batch: usize, nq: usize, nk: usize) -> Vec<f32> {
        let threads = kernel_threads();
        let c = self.q.out_features();
        let d = c / self.heads;
        let scale = 1.0 / (d as f32).sqrt().sqrt();
        let mut q = self.q.channels(x, batch, nq, threads);
        let mut k = self.k.channels(kv, batch, nk, threads);
        let v = self.v.channels(kv, batch, nk, threads);
        q.iter_mut().chain(k.iter_mut()).for_each(|t| *t *= scale);
        // One (image, head) pair: rows h·d.. of that image's q, k, v and mixed output.
        let head = |(i, dst): (usize, &mut [MaybeUninit<f32>]), threads: usize| {
            let (qh, kh, vh) = (
                &q[i * d * nq..(i + 1) * d * nq],
                &k[i * d * nk..(i + 1) * d * nk],
                &v[i * d * nk..(i + 1) * d * nk],
            );
            // The transposed scores (nk × nq) = k_hᵀ · q_h, each query's column softmaxed,
            // so that both products read their right operand row by row.
            let kt = PackedA::new(kh, nk, d, 1, nk);
            let transposed_scores = |s: &mut [MaybeUninit<f32>]| {
                let out = Output::batch_unfilled(s, nk, nq);
                gemm(&kt, &Matrix::new(qh, nq, 1), nq, out, false, None, threads);
                Ok::<_, Infallible>(())
            };
            // SAFETY: the product writes all nk × nq values.
            let Ok(mut scores) = unsafe { written(nk * nq, transposed_scores) };
            softmax_columns(&mut scores, nq);
            // mixed_h (d × nq) = v_h · scoresᵀ.
            let vp = PackedA::new(vh, d, nk, nk, 1);
            let src = Matrix::new(&scores, nq, 1);
            let out = Output::batch_unfilled(dst, d, nq);
            gemm(&vp, &src, nq, out, false, None, threads);
        };
        let len = (d * nq).max(1);
        let work = batch * c * nq * nk;
        let heads = |spare: &mut [MaybeUninit<f32>]| {
            if threads > 1 && batch * self.heads > 1 && work >= PARALLEL_WORK {
                spare
                    .par_chunks_mut(len)
                    .enumerate()
                    .for_each(|p| head(p, 1));
            } else {
                spare
                    .chunks_mut(len)
                    .enumerate()
                    .for_each(|p| head(p, threads));
            }
            Ok::<_, Infallible>(())
        };
        // SAFETY: every head's product writes all of its d × nq values.
        let Ok(mixed) = unsafe { written(batch * c * nq, heads) };
        self.out.channels(&mixed, batch, nq, threads)
    }
}

impl CustomOp2 for AttentionWeights {
    fn name(&self) -> &'static str {
        "packed-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, kv) = (
            f32_values(s1, l1, "attention: input")?,
            f32_values(s2, l2, "attention: context")?,
        );
        let (&[b, c, nq], &[b2, ckv, nk]) = (l1.dims(), l2.dims()) else {
            return Err(Error::Msg(format!(
                "attention: input {:?} and context {:?} must be (B, C, N)",
                l1.dims(),
                l2.dims()
            )));
        };
        if b != b2 || c != self.q.in_features() || ckv != self.k.in_features() {
            return Err(Error::Msg(format!(
                "attention: input {:?} and context {:?} do not fit the weights",
                l1.dims(),
                l2.dims()
            )));
        }
        let y = self.batch(x, kv, b, nq, nk);
        Ok((CpuStorage::F32(y), Shape::from((b, c, nq))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::max_abs_diff;
    use candle_core::{Device, D};

    /// Matches the composed computation (projections, per-head scaled scores, softmax,
    /// mixing, output projection) for self- and cross-attention.
    #[test]
    fn packed_attention_matches_composed_ops() {
        let dev = Device::Cpu;
        let r = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let (b, c, heads) = (2, 64, 2);
        for (ckv, nq, nk) in [(64, 16, 16), (32, 16, 32), (64, 9, 9)] {
            let (wq, wk, wv, wo) = (
                r(&[c, c, 1]),
                r(&[c, ckv, 1]),
                r(&[c, ckv, 1]),
                r(&[c, c, 1]),
            );
            let (bq, bk, bv, bo) = (r(&[c]), r(&[c]), r(&[c]), r(&[c]));
            let x = r(&[b, c, nq]);
            let kv = r(&[b, ckv, nk]);
            let proj = |w: &Tensor, bias: &Tensor, t: &Tensor| {
                t.conv1d(w, 0, 1, 1, 1)
                    .unwrap()
                    .broadcast_add(&bias.reshape((1, c, 1)).unwrap())
                    .unwrap()
            };
            let d = c / heads;
            let s = 1.0 / (d as f64).sqrt().sqrt();
            let q = (proj(&wq, &bq, &x) * s)
                .unwrap()
                .reshape((b * heads, d, nq))
                .unwrap();
            let k = (proj(&wk, &bk, &kv) * s)
                .unwrap()
                .reshape((b * heads, d, nk))
                .unwrap();
            let v = proj(&wv, &bv, &kv).reshape((b * heads, d, nk)).unwrap();
            let w = q.transpose(1, 2).unwrap().matmul(&k).unwrap();
            let w = candle_nn::ops::softmax(&w, D::Minus1).unwrap();
            let mixed = v.matmul(&w.transpose(1, 2).unwrap()).unwrap();
            let want = proj(&wo, &bo, &mixed.reshape((b, c, nq)).unwrap());
            let ours = AttentionWeights::new((&wq, &bq), (&wk, &bk), (&wv, &bv), (&wo, &bo), heads)
                .unwrap();
            let got = ours.forward(&x, &kv).unwrap();
            assert!(
                max_abs_diff(&got, &want) < 1e-3,
                "ckv {ckv}, nq {nq}, nk {nk}"
            );
            let one = ours
                .forward(&x.narrow(0, 1, 1).unwrap(), &kv.narrow(0, 1, 1).unwrap())
                .unwrap();
            assert_eq!(
                one.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                got.narrow(0, 1, 1)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            );
        }
    }
}
