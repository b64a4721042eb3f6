//! GroupNorm for inference in one op: statistics, affine, an optional per-sample channel
//! modulation `· (1 + scale) + shift` and an optional SiLU, in two passes over each group.

use super::math::{dispatch, map_parts, silu};
use super::{f32_values, tensor_values};
use candle_core::{CpuStorage, CustomOp1, Error, Layout, Result, Shape, Tensor};
use std::mem::MaybeUninit;

/// A GroupNorm's affine parameters, as plain values.
#[derive(Debug, Clone)]
pub struct GroupNormWeights {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    groups: usize,
    eps: f64,
}

/// What follows the normalisation inside the same op.
#[derive(Debug, Clone, Default)]
pub struct Epilogue {
    /// Per-sample `(scale, shift)`, each `[B, C]`: `y · (1 + scale) + shift`.
    pub modulation: Option<(Tensor, Tensor)>,
    /// Apply SiLU last.
    pub silu: bool,
}

struct GroupNormOp<'a> {
    w: &'a GroupNormWeights,
    modulation: Option<(Vec<f32>, Vec<f32>)>,
    silu: bool,
}

/// Sum of `x` in double precision, eight lanes at a time.
fn sum(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f(v);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

impl GroupNormWeights {
    /// `gamma`, `beta`: `[C]`; `groups` must divide `C`.
    pub fn new(gamma: &Tensor, beta: &Tensor, groups: usize, eps: f64) -> Result<Self> {
        let (gamma, beta) = (tensor_values(gamma)?, tensor_values(beta)?);
        if groups == 0 || gamma.len() % groups != 0 || beta.len() != gamma.len() {
            return Err(Error::Msg(format!(
                "group norm: {} channels, {} biases, {groups} groups",
                gamma.len(),
                beta.len()
            )));
        }
        Ok(Self {
            gamma,
            beta,
            groups,
            eps,
        })
    }

    /// Normalises `x [B, C, …]` (F32, CPU), then applies `epilogue`.
    pub fn forward(&self, x: &Tensor, epilogue: &Epilogue) -> Result<Tensor> {
        let (b, c) = (x.dim(0)?, x.dim(1)?);
        let modulation = match &epilogue.modulation {
            Some((scale, shift)) => {
                let v = |t: &Tensor| -> Result<Vec<f32>> {
                    if t.dims() != [b, c] {
                        return Err(Error::Msg(format!(
                            "group norm: modulation {:?} is not [{b}, {c}]",
                            t.dims()
                        )));
                    }
                    tensor_values(t)
                };
                Some((v(scale)?, v(shift)?))
            }
            None => None,
        };
        x.contiguous()?.apply_op1_no_bwd(&GroupNormOp {
            w: self,
            modulation,
            silu: epilogue.silu,
        })
    }
}

impl CustomOp1 for GroupNormOp<'_> {
    fn name(&self) -> &'static str {
        "group-norm-inference"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_values(s, l, "group norm: input")?;
        let dims = l.dims();
        let (c, spatial) = match dims {
            [_, c, rest @ ..] => (*c, rest.iter().product::<usize>()),
            _ => {
                return Err(Error::Msg(format!(
                    "group norm: input {dims:?} is not [B, C, …]"
                )))
            }
        };
        let w = self.w;
        if c != w.gamma.len() {
            return Err(Error::Msg(format!(
                "group norm: input has {c} channels, weights {}",
                w.gamma.len()
            )));
        }
        let cpg = c / w.groups;
        let run = (cpg * spatial).max(1);
        let body = |(i, (y_g, x_g)): (usize, (&mut [MaybeUninit<f32>], &[f32]))| {
            let n = x_g.len().max(1) as f64;
            let mean = sum(x_g, |v| v as f64) / n;
            let var = sum(x_g, |v| {
                let d = v as f64 - mean;
                d * d
            }) / n;
            let invstd = 1.0 / (var + w.eps).sqrt();
            let (sample, first) = (i / w.groups, (i % w.groups) * cpg);
            for k in 0..cpg {
                let ch = first + k;
                let a = w.gamma[ch] as f64 * invstd;
                let (mut a, mut b) = (a as f32, (w.beta[ch] as f64 - mean * a) as f32);
                if let Some((scale, shift)) = &self.modulation {
                    let m = 1.0 + scale[sample * c + ch];
                    (a, b) = (a * m, b * m + shift[sample * c + ch]);
                }
                let (ys, xs) = (
                    &mut y_g[k * spatial..(k + 1) * spatial],
                    &x_g[k * spatial..],
                );
                if self.silu {
                    dispatch(
                        #[inline(always)]
                        || {
                            ys.iter_mut().zip(xs).for_each(|(y, &x)| {
                                y.write(silu(a * x + b));
                            })
                        },
                    );
                } else {
                    ys.iter_mut().zip(xs).for_each(|(y, &x)| {
                        y.write(a * x + b);
                    });
                }
            }
        };
        // Parts of whole groups; the body writes every channel of its group.
        let y = map_parts(x, run, |first, xs, ys| {
            ys.chunks_mut(run)
                .zip(xs.chunks(run))
                .enumerate()
                .for_each(|(i, pair)| body((first / run + i, pair)))
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::max_abs_diff;
    use candle_core::{DType, Device, Module};

    #[test]
    fn fused_group_norm_matches_candle_with_modulation_and_silu() {
        let dev = Device::Cpu;
        let (b, c, h) = (3, 64, 5);
        let x = Tensor::randn(0.5f32, 3.0, (b, c, h, h), &dev).unwrap();
        let gamma = Tensor::randn(0f32, 1.0, c, &dev).unwrap();
        let beta = Tensor::randn(0f32, 1.0, c, &dev).unwrap();
        let scale = Tensor::randn(0f32, 1.0, (b, c), &dev).unwrap();
        let shift = Tensor::randn(0f32, 1.0, (b, c), &dev).unwrap();
        let gn = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, 32, 1e-5).unwrap();
        let plain = gn.forward(&x).unwrap();
        let ours = GroupNormWeights::new(&gamma, &beta, 32, 1e-5).unwrap();
        let got = ours.forward(&x, &Epilogue::default()).unwrap();
        assert!(max_abs_diff(&got, &plain) < 1e-5);
        let bc = |t: &Tensor| t.reshape((b, c, 1, 1)).unwrap();
        let want = plain
            .broadcast_mul(&(bc(&scale) + 1.0).unwrap())
            .unwrap()
            .broadcast_add(&bc(&shift))
            .unwrap()
            .silu()
            .unwrap();
        let epilogue = Epilogue {
            modulation: Some((scale, shift)),
            silu: true,
        };
        let got = ours.forward(&x, &epilogue).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5);
        // A [B, C, N] sequence works too.
        let seq = x.reshape((b, c, h * h)).unwrap();
        let got = ours.forward(&seq, &Epilogue::default()).unwrap();
        assert!(max_abs_diff(&got, &plain.reshape((b, c, h * h)).unwrap()) < 1e-5);
    }

    #[test]
    fn group_norm_geometry_errors_name_the_shapes() {
        let dev = Device::Cpu;
        let g = Tensor::ones(6, DType::F32, &dev).unwrap();
        assert!(GroupNormWeights::new(&g, &g, 4, 1e-5).is_err());
        let ours = GroupNormWeights::new(&g, &g, 3, 1e-5).unwrap();
        let x = Tensor::zeros((1, 4, 2, 2), DType::F32, &dev).unwrap();
        let err = ours
            .forward(&x, &Epilogue::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("4 channels"), "{err}");
    }
}
