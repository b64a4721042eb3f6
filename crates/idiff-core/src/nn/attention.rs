//! Multi-head attention as one CPU op with a hand-written backward pass.
//!
//! For queries `q (d × Nq)`, keys `k (d × Nk)` and values `v (d × Nk)` of one head:
//! `S = α·qᵀk`, `P = softmax_rows(S)`, `O = v·Pᵀ (d × Nq)`. The backward pass recomputes
//! `P` (it is small) and takes
//! `dv = dO·P`, `dP = dOᵀ·v`, `dS = P ⊙ (dP − rowsum(dP ⊙ P))`, `dq = α·k·dSᵀ`,
//! `dk = α·q·dS`.
//! Heads run in parallel, each product on the packed GEMM. candle composes the same from a
//! dozen ops (transposes, two batched matmuls, a five-op softmax), each with its own
//! backward pass and gradient buffers.

use crate::kernels::f32_values;
use crate::kernels::gemm::matmul;
use crate::kernels::math;
use candle_core::{CpuStorage, CustomOp3, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Sizes of one call: `heads` (batch × heads), head channels `d`, queries and keys.
#[derive(Debug, Clone, Copy)]
struct Dims {
    heads: usize,
    d: usize,
    nq: usize,
    nk: usize,
}

impl Dims {
    fn new(q: &[usize], k: &[usize], v: &[usize]) -> Result<Self> {
        match (q, k, v) {
            (&[h, d, nq], &[hk, dk, nk], &[hv, dv, nv])
                if (hk, dk) == (h, d) && (hv, dv, nv) == (h, d, nk) =>
            {
                Ok(Self {
                    heads: h,
                    d,
                    nq,
                    nk,
                })
            }
            _ => Err(Error::Msg(format!(
                "attention: q {q:?}, k {k:?} and v {v:?} must be (heads, d, Nq), (heads, d, Nk) twice"
            ))),
        }
    }
}

/// `P = softmax_rows(α·qᵀk)` (Nq × Nk) of one head; row `c` of `k` starts at `c · k_rs`.
fn weights(q: &[f32], k: &[f32], k_rs: usize, dm: Dims, alpha: f32) -> Vec<f32> {
    let (d, nq, nk) = (dm.d, dm.nq, dm.nk);
    let mut p = vec![0f32; nq * nk];
    // A = qᵀ (Nq × d): A[i][c] = q[c·Nq + i]; B = k (d × Nk).
    matmul(nq, nk, d, &mut p, false, q, 1, nq, k, k_rs, 1, 1);
    for row in p.chunks_exact_mut(nk) {
        math::map_in_place(row, |s| s * alpha);
        math::softmax(row);
    }
    p
}

/// The attention op; `alpha` scales the scores.
#[derive(Debug, Clone, Copy)]
struct AttentionOp {
    alpha: f32,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = Dims::new(l1.dims(), l2.dims(), l3.dims())?;
        let (q, k, v) = (
            f32_values(s1, l1, "attention: queries")?,
            f32_values(s2, l2, "attention: keys")?,
            f32_values(s3, l3, "attention: values")?,
        );
        let (d, nq, nk) = (dm.d, dm.nq, dm.nk);
        let mut out = vec![0f32; dm.heads * d * nq];
        out.par_chunks_mut((d * nq).max(1))
            .enumerate()
            .for_each(|(h, o)| {
                let (qh, kh, vh) = (
                    &q[h * d * nq..][..d * nq],
                    &k[h * d * nk..][..d * nk],
                    &v[h * d * nk..][..d * nk],
                );
                let p = weights(qh, kh, nk, dm, self.alpha);
                // O (d × Nq) = v · Pᵀ: B[j][i] = P[i·Nk + j].
                matmul(d, nq, nk, o, false, vh, nk, 1, &p, 1, nk, 1);
            });
        Ok((CpuStorage::F32(out), Shape::from((dm.heads, d, nq))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (nq, nk) = (q.dim(2)?, k.dim(2)?);
        // One op computes all three gradients side by side: [dq | dk | dv] along the last axis.
        let both = Tensor::cat(&[k, v], 2)?;
        let all = q.apply_op3_no_bwd(&both, &grad.contiguous()?, &AttentionBwdOp(*self))?;
        Ok((
            Some(all.narrow(2, 0, nq)?.contiguous()?),
            Some(all.narrow(2, nq, nk)?.contiguous()?),
            Some(all.narrow(2, nq + nk, nk)?.contiguous()?),
        ))
    }
}

/// `(q, [k | v], dO) → [dq | dk | dv]` (heads × d × (Nq + 2·Nk)).
struct AttentionBwdOp(AttentionOp);

impl CustomOp3 for AttentionBwdOp {
    fn name(&self) -> &'static str {
        "fused-attention-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (qd, kvd, gd) = (l1.dims(), l2.dims(), l3.dims());
        let (&[h, d, nq], &[_, _, nkv]) = (qd, kvd) else {
            return Err(Error::Msg("attention backward: inputs must be 3-d".into()));
        };
        let nk = nkv / 2;
        let dm = Dims::new(qd, &[h, d, nk], &[h, d, nk])?;
        if kvd != [h, d, 2 * nk] || gd != [h, d, nq] {
            return Err(Error::Msg(format!(
                "attention backward: keys and values {kvd:?} or gradient {gd:?} do not match queries {qd:?}"
            )));
        }
        let (q, kv, g) = (
            f32_values(s1, l1, "attention: queries")?,
            f32_values(s2, l2, "attention: keys and values")?,
            f32_values(s3, l3, "attention: gradient")?,
        );
        let alpha = self.0.alpha;
        let width = nq + 2 * nk;
        let mut out = vec![0f32; h * d * width];
        out.par_chunks_mut((d * width).max(1))
            .enumerate()
            .for_each(|(hd, o)| {
                let qh = &q[hd * d * nq..][..d * nq];
                let gh = &g[hd * d * nq..][..d * nq];
                // Keys and values of this head, read in place: rows of 2·Nk, keys first.
                let kvh = &kv[hd * d * 2 * nk..][..d * 2 * nk];
                let (kh, vh) = (kvh, &kvh[nk..]);
                let p = weights(qh, kh, 2 * nk, dm, alpha);
                // dv (d × Nk) = dO · P.
                let mut dv = vec![0f32; d * nk];
                matmul(d, nk, nq, &mut dv, false, gh, nq, 1, &p, nk, 1, 1);
                // dP (Nq × Nk) = dOᵀ · v, then dS = α·P ⊙ (dP − rowsum(dP ⊙ P)).
                let mut ds = vec![0f32; nq * nk];
                matmul(nq, nk, d, &mut ds, false, gh, 1, nq, vh, 2 * nk, 1, 1);
                for (drow, prow) in ds.chunks_exact_mut(nk).zip(p.chunks_exact(nk)) {
                    let dot: f32 = drow.iter().zip(prow).map(|(a, b)| a * b).sum();
                    for (dv, &pv) in drow.iter_mut().zip(prow) {
                        *dv = alpha * pv * (*dv - dot);
                    }
                }
                // dq (d × Nq) = k · dSᵀ; dk (d × Nk) = q · dS.
                let mut dq = vec![0f32; d * nq];
                matmul(d, nq, nk, &mut dq, false, kh, 2 * nk, 1, &ds, 1, nk, 1);
                let mut dk = vec![0f32; d * nk];
                matmul(d, nk, nq, &mut dk, false, qh, nq, 1, &ds, nk, 1, 1);
                for c in 0..d {
                    let row = &mut o[c * width..][..width];
                    row[..nq].copy_from_slice(&dq[c * nq..][..nq]);
                    row[nq..nq + nk].copy_from_slice(&dk[c * nk..][..nk]);
                    row[nq + nk..].copy_from_slice(&dv[c * nk..][..nk]);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((h, d, width))))
    }
}

/// Attention of queries `q (heads, d, Nq)` over keys `k` and values `v (heads, d, Nk)` with
/// scores `alpha·qᵀk`: `(heads, d, Nq)`, differentiable (F32 CPU tensors).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, alpha: f64) -> Result<Tensor> {
    if [q, k, v]
        .iter()
        .any(|t| t.dtype() != DType::F32 || !t.device().is_cpu())
    {
        return Err(Error::Msg("fused attention: F32 CPU tensors only".into()));
    }
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        AttentionOp {
            alpha: alpha as f32,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::testutil::{max_abs, max_abs_diff, probed_grads};

    /// Values and the gradients of queries, keys and values against candle's composed
    /// attention (transposes, batched matmuls, softmax).
    #[test]
    fn matches_candle_values_and_gradients() {
        let dev = Device::Cpu;
        for (h, d, nq, nk) in [(3, 4, 5, 7), (2, 8, 16, 16), (1, 3, 1, 2)] {
            let q = Var::randn(0f32, 1.0, (h, d, nq), &dev).unwrap();
            let k = Var::randn(0f32, 1.0, (h, d, nk), &dev).unwrap();
            let v = Var::randn(0f32, 1.0, (h, d, nk), &dev).unwrap();
            let alpha = 0.7;
            let ours = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), alpha).unwrap();
            let s = (q
                .as_tensor()
                .transpose(1, 2)
                .unwrap()
                .matmul(k.as_tensor())
                .unwrap()
                * alpha)
                .unwrap();
            let p = candle_nn::ops::softmax(&s, candle_core::D::Minus1).unwrap();
            let theirs = v
                .as_tensor()
                .matmul(&p.transpose(1, 2).unwrap().contiguous().unwrap())
                .unwrap();
            assert_eq!(ours.dims(), &[h, d, nq]);
            assert!(max_abs_diff(&ours, &theirs) < 1e-5);
            let probe = Tensor::randn(0f32, 1.0, (h, d, nq), &dev).unwrap();
            let g_ours = probed_grads(&ours, &probe);
            let g_theirs = probed_grads(&theirs, &probe);
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, b) = (
                    g_ours.get(var.as_tensor()).unwrap(),
                    g_theirs.get(var.as_tensor()).unwrap(),
                );
                assert!(
                    max_abs_diff(a, b) <= 1e-4 * max_abs(b).max(1.0),
                    "{name} ({h}, {d}, {nq}, {nk}): {}",
                    max_abs_diff(a, b)
                );
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((2, 4, 5), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((2, 4, 6), DType::F32, &dev).unwrap();
        let v = Tensor::zeros((2, 3, 6), DType::F32, &dev).unwrap();
        let err = attention(&q, &k, &v, 1.0).unwrap_err().to_string();
        assert!(err.contains("must be (heads, d, Nq)"), "{err}");
    }
}
