//! The training-side IResNet: the same architecture and parameter names as
//! [`crate::models::iresnet::IResNet`] (so checkpoints load with `IResNet::load`), built on
//! [`crate::nn::conv::conv2d`] whose CPU backward is fast, plus two options for small
//! experiments: the stem `width` (stage channels `w, 2w, 4w, 8w`; IResNet is 64) and the
//! `input_size` (a multiple of 16; IResNet is 112). With the defaults the network is
//! exactly IResNet (checked by a test on shared weights).

use crate::models::iresnet::IResNetConfig;
use crate::nn::conv::conv2d;
use crate::nn::fused::{TrainBatchNorm, TrainPrelu};
use anyhow::{anyhow, bail, Result};
use candle_core::{Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

/// Epsilon of every BatchNorm (as in IResNet).
const BN_EPS: f64 = 1e-5;

/// Architecture of a [`TrainNet`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetConfig {
    /// IBasicBlocks per stage (four stages).
    pub layers: Vec<usize>,
    /// Embedding size.
    pub num_features: usize,
    /// Dropout before `fc` in training.
    pub dropout: f64,
    /// Channels of the stem and first stage (64 for IResNet).
    pub width: usize,
    /// Input side length, a multiple of 16 (112 for IResNet).
    pub input_size: usize,
}

impl NetConfig {
    /// Checks the config.
    pub fn validate(&self) -> Result<()> {
        if self.layers.len() != 4 || self.layers.contains(&0) {
            bail!(
                "backbone layers must be four positive block counts, got {:?}",
                self.layers
            );
        }
        if self.num_features == 0 || self.width == 0 {
            bail!("backbone num_features and width must be positive");
        }
        if self.input_size == 0 || !self.input_size.is_multiple_of(16) {
            bail!(
                "input size must be a positive multiple of 16, got {}",
                self.input_size
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("dropout must be in [0, 1), got {}", self.dropout);
        }
        Ok(())
    }

    fn stages(&self) -> [usize; 4] {
        [self.width, 2 * self.width, 4 * self.width, 8 * self.width]
    }

    /// Infers the architecture from backbone tensor names and shapes
    /// ([`IResNetConfig::infer`]); dropout is set to 0.
    pub fn infer<'a>(shapes: impl IntoIterator<Item = (&'a str, &'a [usize])>) -> Result<Self> {
        let c = IResNetConfig::infer(shapes).map_err(|e| anyhow!("{e}"))?;
        let cfg = Self {
            layers: c.layers,
            num_features: c.num_features,
            dropout: 0.0,
            width: c.width,
            input_size: c.input_size,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

fn bn(channels: usize, vb: VarBuilder) -> Result<TrainBatchNorm> {
    Ok(TrainBatchNorm::new(channels, BN_EPS, vb)?)
}

fn prelu(channels: usize, vb: VarBuilder) -> Result<TrainPrelu> {
    Ok(TrainPrelu::new(channels, vb)?)
}

/// A bias-free convolution weight with candle's default (Kaiming-normal) init.
#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    stride: usize,
    pad: usize,
}

impl Conv {
    fn new(cin: usize, cout: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(
            (cout, cin, k, k),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        Ok(Self {
            weight,
            stride,
            pad: k / 2,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(conv2d(x, &self.weight, None, self.stride, self.pad)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    bn1: TrainBatchNorm,
    conv1: Conv,
    bn2: TrainBatchNorm,
    prelu: TrainPrelu,
    conv2: Conv,
    bn3: TrainBatchNorm,
    downsample: Option<(Conv, TrainBatchNorm)>,
}

impl Block {
    fn new(vb: VarBuilder, inplanes: usize, planes: usize, stride: usize) -> Result<Self> {
        let downsample = if stride != 1 || inplanes != planes {
            let vb_ds = vb.pp("downsample");
            Some((
                Conv::new(inplanes, planes, 1, stride, vb_ds.pp("0"))?,
                bn(planes, vb_ds.pp("1"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            bn1: bn(inplanes, vb.pp("bn1"))?,
            conv1: Conv::new(inplanes, planes, 3, 1, vb.pp("conv1"))?,
            bn2: bn(planes, vb.pp("bn2"))?,
            prelu: prelu(planes, vb.pp("prelu"))?,
            conv2: Conv::new(planes, planes, 3, stride, vb.pp("conv2"))?,
            bn3: bn(planes, vb.pp("bn3"))?,
            downsample,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.bn1.forward_t(x, train)?;
        let h = self.conv1.forward(&h)?;
        let h = self.bn2.forward_t(&h, train)?;
        let h = self.prelu.forward(&h)?;
        let h = self.conv2.forward(&h)?;
        let h = self.bn3.forward_t(&h, train)?;
        let identity = match &self.downsample {
            Some((conv, norm)) => norm.forward_t(&conv.forward(x)?, train)?,
            None => x.clone(),
        };
        Ok((h + identity)?)
    }
}

/// The trainable IResNet (see the module docs).
#[derive(Debug, Clone)]
pub struct TrainNet {
    conv1: Conv,
    bn1: TrainBatchNorm,
    prelu: TrainPrelu,
    layers: Vec<Vec<Block>>,
    bn2: TrainBatchNorm,
    fc: Linear,
    features: TrainBatchNorm,
    cfg: NetConfig,
}

impl TrainNet {
    /// Builds the network in `vb` with IResNet's parameter names.
    pub fn new(vb: VarBuilder, cfg: &NetConfig) -> Result<Self> {
        cfg.validate()?;
        let stages = cfg.stages();
        let mut inplanes = stages[0];
        let conv1 = Conv::new(3, inplanes, 3, 1, vb.pp("conv1"))?;
        let bn1 = bn(inplanes, vb.pp("bn1"))?;
        let prelu_stem = prelu(inplanes, vb.pp("prelu"))?;
        let mut layers = Vec::with_capacity(4);
        for (s, (&planes, &count)) in stages.iter().zip(&cfg.layers).enumerate() {
            let vb_stage = vb.pp(format!("layer{}", s + 1));
            let blocks = (0..count)
                .map(|i| {
                    let stride = if i == 0 { 2 } else { 1 };
                    let b = Block::new(vb_stage.pp(i), inplanes, planes, stride);
                    inplanes = planes;
                    b
                })
                .collect::<Result<Vec<_>>>()?;
            layers.push(blocks);
        }
        let side = cfg.input_size / 16;
        Ok(Self {
            conv1,
            bn1,
            prelu: prelu_stem,
            layers,
            bn2: bn(stages[3], vb.pp("bn2"))?,
            fc: linear(stages[3] * side * side, cfg.num_features, vb.pp("fc"))?,
            features: bn(cfg.num_features, vb.pp("features"))?,
            cfg: cfg.clone(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    /// Raw embeddings `[B, num_features]` of `[B, 3, S, S]` inputs in [-1, 1]; `train` uses
    /// batch statistics (updating the running ones) and dropout.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let s = self.cfg.input_size;
        let dims = x.dims();
        if dims.len() != 4 || dims[1] != 3 || dims[2] != s || dims[3] != s {
            bail!("backbone expects input [B, 3, {s}, {s}], got {dims:?}");
        }
        if train && dims[0] < 2 {
            bail!("training needs a batch of at least 2 for BatchNorm");
        }
        let mut h = self.conv1.forward(x)?;
        h = self.bn1.forward_t(&h, train)?;
        h = self.prelu.forward(&h)?;
        for stage in &self.layers {
            for block in stage {
                h = block.forward_t(&h, train)?;
            }
        }
        h = self.bn2.forward_t(&h, train)?.flatten_from(1)?;
        if train && self.cfg.dropout > 0.0 {
            h = candle_nn::ops::dropout(&h, self.cfg.dropout as f32)?;
        }
        let h = self.fc.forward(&h)?;
        Ok(self.features.forward_t(&h, train)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::iresnet::{IResNet, IResNetConfig};
    use crate::testutil::max_abs_diff;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn matches_iresnet_on_shared_weights() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let cfg = NetConfig {
            layers: vec![1, 2, 1, 1],
            num_features: 32,
            dropout: 0.0,
            width: 16,
            input_size: 64,
        };
        let net = TrainNet::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), &cfg).unwrap();
        let x = Tensor::randn(0f32, 1., (4, 3, 64, 64), &dev).unwrap();
        // One training pass moves the running statistics away from their init.
        net.forward_t(&x, true).unwrap();
        let icfg = IResNetConfig {
            layers: cfg.layers.clone(),
            num_features: 32,
            width: 16,
            input_size: 64,
            ..IResNetConfig::iresnet18()
        };
        let reference =
            IResNet::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), &icfg).unwrap();
        let a = net.forward_t(&x, false).unwrap();
        let b = reference.forward(&x).unwrap();
        let diff = max_abs_diff(&a, &b);
        assert!(diff < 1e-3, "max abs diff {diff}");
        let shapes: Vec<(String, Vec<usize>)> = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.dims().to_vec()))
            .collect();
        let inferred =
            NetConfig::infer(shapes.iter().map(|(k, d)| (k.as_str(), d.as_slice()))).unwrap();
        assert_eq!(inferred, cfg);
    }

    #[test]
    fn small_variant_runs_and_bad_configs_fail() {
        let dev = Device::Cpu;
        let cfg = NetConfig {
            layers: vec![1, 1, 1, 1],
            num_features: 8,
            dropout: 0.2,
            width: 8,
            input_size: 32,
        };
        let vm = VarMap::new();
        let net = TrainNet::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), &cfg).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 3, 32, 32), &dev).unwrap();
        assert_eq!(net.forward_t(&x, true).unwrap().dims(), &[2, 8]);
        assert!(net.forward_t(&x.narrow(0, 0, 1).unwrap(), true).is_err());
        assert!(net
            .forward_t(
                &Tensor::zeros((2, 3, 48, 48), DType::F32, &dev).unwrap(),
                false
            )
            .is_err());
        let bad = NetConfig {
            input_size: 40,
            ..cfg.clone()
        };
        assert!(bad.validate().is_err());
        let bad = NetConfig {
            layers: vec![1, 1],
            ..cfg
        };
        assert!(bad.validate().is_err());
    }
}
