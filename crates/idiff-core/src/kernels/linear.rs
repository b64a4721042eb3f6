//! Linear layers (and 1×1 projections) as packed matrix products: `y = W · x + b` applied to
//! the rows of a `(B, in)` matrix, or to every position of a `(B, in, N)` sequence. Each
//! output value is the same chain of multiply–adds whatever the batch, so a row's result
//! never depends on the rows beside it.

use super::gemm::{gemm, kernel_threads, Matrix, Output, PackedA};
use super::{f32_values, tensor_values, written};
use candle_core::{CpuStorage, CustomOp1, Error, Layout, Result, Shape, Tensor};
use std::convert::Infallible;
use std::mem::MaybeUninit;

/// A linear layer's weight `[out, in]` (or a 1×1 convolution's `[out, in, 1(, 1)]`), packed,
/// with its bias.
#[derive(Debug, Clone)]
pub struct LinearWeights {
    weight: PackedA,
    bias: Option<Vec<f32>>,
}

/// How a [`LinearWeights`] op reads its input.
#[derive(Clone, Copy)]
enum Layout2 {
    /// `(B, in)` → `(B, out)`.
    Rows,
    /// `(B, in, N)` → `(B, out, N)`.
    Channels,
}

struct LinearOp<'a>(&'a LinearWeights, Layout2);

impl LinearWeights {
    /// Packs `weight` (`[out, in, …]` with trailing ones) and `bias` (`[out]`).
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let out = weight.dim(0)?;
        let inp = weight.elem_count() / out.max(1);
        let w = tensor_values(weight)?;
        let bias = bias.map(tensor_values).transpose()?;
        if bias.as_ref().is_some_and(|b| b.len() != out) {
            return Err(Error::Msg(format!(
                "linear: bias does not have {out} values"
            )));
        }
        Ok(Self {
            weight: PackedA::new(&w, out, inp, inp, 1),
            bias,
        })
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight.rows()
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.weight.depth()
    }

    /// `x (batch × in)` → `(batch × out)`.
    pub fn rows(&self, x: &[f32], batch: usize, threads: usize) -> Vec<f32> {
        let (out, inp) = (self.out_features(), self.in_features());
        let mut y = vec![0f32; batch * out];
        let src = Matrix::new(x, 1, inp);
        let dst = Output::transposed(&mut y, out);
        gemm(
            &self.weight,
            &src,
            batch,
            dst,
            false,
            self.bias.as_deref(),
            threads,
        );
        y
    }

    /// `x (batch, in, n)` → `(batch, out, n)`.
    pub fn channels(&self, x: &[f32], batch: usize, n: usize, threads: usize) -> Vec<f32> {
        let (out, inp) = (self.out_features(), self.in_features());
        let src = Matrix::batch(x, inp, n);
        let bias = self.bias.as_deref();
        let product = |y: &mut [MaybeUninit<f32>]| {
            let dst = Output::batch_unfilled(y, out, n);
            gemm(&self.weight, &src, batch * n, dst, false, bias, threads);
            Ok::<_, Infallible>(())
        };
        // SAFETY: the product (not accumulating) writes every value.
        let Ok(y) = unsafe { written(batch * out * n, product) };
        y
    }

    /// `x (B, in)` (F32, CPU) → `(B, out)`.
    pub fn forward_rows(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?
            .apply_op1_no_bwd(&LinearOp(self, Layout2::Rows))
    }

    /// `x (B, in, N)` (F32, CPU) → `(B, out, N)`.
    pub fn forward_channels(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?
            .apply_op1_no_bwd(&LinearOp(self, Layout2::Channels))
    }
}

impl CustomOp1 for LinearOp<'_> {
    fn name(&self) -> &'static str {
        "packed-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_values(s, l, "linear: input")?;
        let (w, threads) = (self.0, kernel_threads());
        let (inp, out) = (w.in_features(), w.out_features());
        match (self.1, l.dims()) {
            (Layout2::Rows, &[b, i]) if i == inp => Ok((
                CpuStorage::F32(w.rows(x, b, threads)),
                Shape::from((b, out)),
            )),
            (Layout2::Channels, &[b, i, n]) if i == inp => Ok((
                CpuStorage::F32(w.channels(x, b, n, threads)),
                Shape::from((b, out, n)),
            )),
            (_, dims) => Err(Error::Msg(format!(
                "linear: input {dims:?} does not fit a {inp} → {out} layer"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::max_abs_diff;
    use candle_core::{Device, Module};

    #[test]
    fn packed_linear_matches_candle_on_rows_and_channels() {
        let dev = Device::Cpu;
        let (b, inp, out, n) = (5, 37, 29, 6);
        let w = Tensor::randn(0f32, 1.0, (out, inp), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, out, &dev).unwrap();
        let lin = candle_nn::Linear::new(w.clone(), Some(bias.clone()));
        let ours = LinearWeights::new(&w, Some(&bias)).unwrap();
        let x = Tensor::randn(0f32, 1.0, (b, inp), &dev).unwrap();
        let got = ours.forward_rows(&x).unwrap();
        assert!(max_abs_diff(&got, &lin.forward(&x).unwrap()) < 1e-4);
        // One row alone gives the same bits as in the batch.
        let one = ours.forward_rows(&x.narrow(0, 3, 1).unwrap()).unwrap();
        assert_eq!(
            one.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            got.narrow(0, 3, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        let seq = Tensor::randn(0f32, 1.0, (b, inp, n), &dev).unwrap();
        let want = lin
            .forward(&seq.transpose(1, 2).unwrap().contiguous().unwrap())
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let got = ours.forward_channels(&seq).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-4);
        let err = ours.forward_rows(&seq).unwrap_err().to_string();
        assert!(err.contains("37 → 29"), "{err}");
    }
}
