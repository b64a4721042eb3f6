//! Margin-based softmax heads (CosFace, ArcFace) over a normalised class-weight matrix,
//! and the cross-entropy they are trained with.
//!
//! With `x̂ = x / ‖x‖` (the embedding) and `ŵ_c = W_c / ‖W_c‖` (row `c` of the
//! `num_classes × num_features` matrix `W`), `cos θ_c = x̂ · ŵ_c` and the logits are
//! - CosFace: `s · (cos θ_c − m·[c = y])`,
//! - ArcFace: `s · cos(θ_y + m)` for the label `y` (with the usual fallback
//!   `cos θ_y − m·sin m` when `θ_y + m > π`, which keeps the logit monotonic), `s · cos θ_c` otherwise.
//!
//! Every op here has a candle gradient (no `softmax_last_dim`); see the gradient test.

use crate::models::iresnet::normalise;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

/// Which margin the head applies to the target logit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Additive cosine margin (Wang et al.), the loss of the IDiff-Face paper.
    #[default]
    CosFace,
    /// Additive angular margin (Deng et al.).
    ArcFace,
}

impl LossKind {
    /// The reference scale `s` (64 for both).
    pub fn default_scale(self) -> f64 {
        64.0
    }

    /// The reference margin `m` (CosFace 0.35, ArcFace 0.5).
    pub fn default_margin(self) -> f64 {
        match self {
            Self::CosFace => 0.35,
            Self::ArcFace => 0.5,
        }
    }

    /// Parses `cosface` / `arcface` (case-insensitive).
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cosface" => Ok(Self::CosFace),
            "arcface" => Ok(Self::ArcFace),
            other => bail!("unknown loss {other:?} (expected cosface or arcface)"),
        }
    }
}

/// A margin head: the loss kind, its `s` and `m`, and the class weights `W`.
#[derive(Debug, Clone)]
pub struct MarginHead {
    weight: Tensor,
    kind: LossKind,
    scale: f64,
    margin: f64,
}

/// Outputs of one head evaluation.
#[derive(Debug, Clone)]
pub struct HeadOutput {
    /// Mean cross-entropy over the batch (scalar).
    pub loss: Tensor,
    /// Fraction of the batch whose largest cosine is the label's.
    pub accuracy: f64,
}

impl MarginHead {
    /// Creates `weight` (`num_classes × num_features`, N(0, 0.01) like arcface_torch's
    /// partial FC) in `vb`.
    pub fn new(
        vb: VarBuilder,
        num_classes: usize,
        num_features: usize,
        kind: LossKind,
        scale: f64,
        margin: f64,
    ) -> Result<Self> {
        if num_classes < 2 {
            bail!("a margin head needs at least 2 classes, got {num_classes}");
        }
        let weight = vb.get_with_hints(
            (num_classes, num_features),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
        )?;
        Self::from_weight(weight, kind, scale, margin)
    }

    /// Wraps an existing `num_classes × num_features` weight.
    pub fn from_weight(weight: Tensor, kind: LossKind, scale: f64, margin: f64) -> Result<Self> {
        if weight.rank() != 2 {
            bail!("head weight must be 2-d, got shape {:?}", weight.dims());
        }
        if !(scale > 0.0 && scale.is_finite()) {
            bail!("margin-head scale s must be positive, got {scale}");
        }
        if !(0.0..std::f64::consts::PI).contains(&margin) {
            bail!("margin m must be in [0, π), got {margin}");
        }
        Ok(Self {
            weight,
            kind,
            scale,
            margin,
        })
    }

    /// Number of classes (rows of `W`).
    pub fn num_classes(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `cos θ` between normalised embeddings `[B, F]` and normalised class weights: `[B, C]`.
    pub fn cosines(&self, embeddings: &Tensor) -> Result<Tensor> {
        let (_, f) = embeddings.dims2()?;
        let wf = self.weight.dims()[1];
        if f != wf {
            bail!("embedding width {f} does not match head weight width {wf}");
        }
        let x = normalise(embeddings)?;
        let w = normalise(&self.weight)?;
        Ok(x.matmul(&w.t()?)?)
    }

    /// Margin logits `[B, C]` for embeddings `[B, F]` and `one_hot` labels `[B, C]` (F32).
    pub fn logits(&self, embeddings: &Tensor, one_hot: &Tensor) -> Result<Tensor> {
        let cos = self.cosines(embeddings)?;
        self.logits_from_cosines(&cos, one_hot)
    }

    /// Applies the margin to precomputed cosines (see the module docs for the formulas).
    pub fn logits_from_cosines(&self, cos: &Tensor, one_hot: &Tensor) -> Result<Tensor> {
        if cos.dims() != one_hot.dims() {
            bail!(
                "cosines {:?} and one-hot labels {:?} differ in shape",
                cos.dims(),
                one_hot.dims()
            );
        }
        let (s, m) = (self.scale, self.margin);
        let logits = match self.kind {
            LossKind::CosFace => (cos - (one_hot * m)?)?,
            LossKind::ArcFace => {
                // cos(θ+m) = cos θ cos m − sin θ sin m, with sin θ = sqrt(1 − cos²θ) kept
                // away from 0 so its gradient stays finite.
                let sin = (1.0 - cos.sqr()?)?.clamp(1e-9f64, 1.0f64)?.sqrt()?;
                let phi = ((cos * m.cos())? - (sin * m.sin())?)?;
                // θ + m > π ⇔ cos θ < cos(π − m): use cos θ − m·sin m there instead.
                let threshold = (std::f64::consts::PI - m).cos();
                let fallback = (cos - m * m.sin())?;
                let use_phi = cos.gt(threshold)?;
                let target = use_phi.where_cond(&phi, &fallback)?;
                (cos + (one_hot * (target - cos)?)?)?
            }
        };
        Ok((logits * s)?)
    }

    /// Loss and train accuracy for embeddings `[B, F]` and integer labels.
    pub fn forward(&self, embeddings: &Tensor, labels: &[u32]) -> Result<HeadOutput> {
        let one_hot = one_hot(labels, self.num_classes(), embeddings.device())?;
        let cos = self.cosines(embeddings)?;
        let logits = self.logits_from_cosines(&cos, &one_hot)?;
        let loss = cross_entropy(&logits, &one_hot)?;
        let predicted = cos.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let correct = predicted.iter().zip(labels).filter(|(p, l)| p == l).count();
        Ok(HeadOutput {
            loss,
            accuracy: correct as f64 / labels.len().max(1) as f64,
        })
    }

    /// The class-weight tensor `W` (un-normalised).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// `[B, C]` F32 one-hot matrix of `labels`; errors on a label `>= num_classes`.
pub fn one_hot(labels: &[u32], num_classes: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mut data = vec![0f32; labels.len() * num_classes];
    for (i, &l) in labels.iter().enumerate() {
        if l as usize >= num_classes {
            bail!("label {l} out of range for {num_classes} classes");
        }
        data[i * num_classes + l as usize] = 1.0;
    }
    Ok(Tensor::from_vec(data, (labels.len(), num_classes), device)?)
}

/// Mean cross-entropy `−Σ one_hot · log_softmax(logits)` over the batch, built from
/// `candle_nn::ops::log_softmax` (which keeps gradients).
pub fn cross_entropy(logits: &Tensor, one_hot: &Tensor) -> Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = (log_p * one_hot)?.sum(D::Minus1)?;
    Ok(picked.neg()?.mean_all()?.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn head(kind: LossKind, w: &[[f32; 2]]) -> MarginHead {
        let flat: Vec<f32> = w.iter().flatten().copied().collect();
        let w = Tensor::from_vec(flat, (w.len(), 2), &Device::Cpu).unwrap();
        MarginHead::from_weight(w, kind, kind.default_scale(), kind.default_margin()).unwrap()
    }

    fn close(a: &[f32], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((*x as f64 - y).abs() <= tol, "{a:?} vs {b:?}");
        }
    }

    /// Embedding at angle 0 and class weights at 30°, 90° and 170° (with non-unit norms):
    /// cosines are cos 30°, 0, cos 170°.
    fn setup(kind: LossKind) -> (MarginHead, Tensor) {
        let d = |deg: f64| deg.to_radians();
        let w = [
            [(2.0 * d(30.).cos()) as f32, (2.0 * d(30.).sin()) as f32],
            [0.0, 3.0],
            [(0.5 * d(170.).cos()) as f32, (0.5 * d(170.).sin()) as f32],
        ];
        let h = head(kind, &w);
        let x = Tensor::new(&[[5f32, 0.], [5., 0.]], &Device::Cpu).unwrap();
        (h, x)
    }

    #[test]
    fn cosface_logits_match_hand_computation() {
        let (h, x) = setup(LossKind::CosFace);
        let oh = one_hot(&[0, 2], 3, &Device::Cpu).unwrap();
        let got = h.logits(&x, &oh).unwrap().to_vec2::<f32>().unwrap();
        let c30 = 30f64.to_radians().cos();
        let c170 = 170f64.to_radians().cos();
        close(&got[0], &[64.0 * (c30 - 0.35), 0.0, 64.0 * c170], 1e-4);
        close(&got[1], &[64.0 * c30, 0.0, 64.0 * (c170 - 0.35)], 1e-4);
    }

    #[test]
    fn arcface_logits_match_hand_computation() {
        let (h, x) = setup(LossKind::ArcFace);
        let oh = one_hot(&[0, 1], 3, &Device::Cpu).unwrap();
        let got = h.logits(&x, &oh).unwrap().to_vec2::<f32>().unwrap();
        let r = |deg: f64| deg.to_radians();
        let c30 = r(30.).cos();
        let c170 = r(170.).cos();
        // θ = 30° → cos(30° + 28.65°); θ = 90° → cos(90° + 28.65°).
        close(
            &got[0],
            &[64.0 * (r(30.) + 0.5).cos(), 0.0, 64.0 * c170],
            1e-3,
        );
        close(
            &got[1],
            &[64.0 * c30, 64.0 * (r(90.) + 0.5).cos(), 64.0 * c170],
            1e-3,
        );
        // θ = 170° with m = 0.5 rad passes π: fallback cos θ − m sin m.
        let oh = one_hot(&[2, 2], 3, &Device::Cpu).unwrap();
        let got = h.logits(&x, &oh).unwrap().to_vec2::<f32>().unwrap();
        close(&got[0][2..], &[64.0 * (c170 - 0.5 * 0.5f64.sin())], 1e-3);
    }

    #[test]
    fn cross_entropy_matches_hand_computation() {
        let logits = Tensor::new(&[[1f32, 2., 3.], [0., 0., 0.]], &Device::Cpu).unwrap();
        let oh = one_hot(&[2, 0], 3, &Device::Cpu).unwrap();
        let got = cross_entropy(&logits, &oh)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        let want = ((lse - 3.0) + 3f64.ln()) / 2.0;
        assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn loss_gradient_matches_finite_differences() {
        for kind in [LossKind::CosFace, LossKind::ArcFace] {
            let w0 = [[0.3f32, -0.2, 0.5], [0.1, 0.4, -0.3], [-0.5, 0.2, 0.1]];
            let x = Tensor::new(&[[0.2f32, 0.7, -0.1], [-0.4, 0.1, 0.6]], &Device::Cpu).unwrap();
            let labels = [1u32, 2];
            let loss_at = |w: &Tensor| -> f64 {
                let h = MarginHead::from_weight(w.clone(), kind, 4.0, 0.3).unwrap();
                h.forward(&x, &labels)
                    .unwrap()
                    .loss
                    .to_scalar::<f32>()
                    .unwrap() as f64
            };
            let var = Var::new(&w0, &Device::Cpu).unwrap();
            let h = MarginHead::from_weight(var.as_tensor().clone(), kind, 4.0, 0.3).unwrap();
            let grads = h.forward(&x, &labels).unwrap().loss.backward().unwrap();
            let g = grads
                .get(var.as_tensor())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let eps = 1e-2f32;
            for i in 0..3 {
                for j in 0..3 {
                    let mut plus = w0;
                    plus[i][j] += eps;
                    let mut minus = w0;
                    minus[i][j] -= eps;
                    let fd = (loss_at(&Tensor::new(&plus, &Device::Cpu).unwrap())
                        - loss_at(&Tensor::new(&minus, &Device::Cpu).unwrap()))
                        / (2.0 * eps as f64);
                    assert!(
                        (fd - g[i][j] as f64).abs() < 2e-3,
                        "{kind:?} dL/dW[{i}][{j}]: analytic {} vs fd {fd}",
                        g[i][j]
                    );
                }
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(one_hot(&[3], 3, &Device::Cpu).is_err());
        assert!(LossKind::parse("softmax").is_err());
        assert_eq!(LossKind::parse("ArcFace").unwrap(), LossKind::ArcFace);
        let (h, _) = setup(LossKind::CosFace);
        let x = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(h.forward(&x, &[0, 1]).is_err());
    }
}
