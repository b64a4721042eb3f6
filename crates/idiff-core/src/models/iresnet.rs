//! InsightFace arcface_torch / ElasticFace IResNet face-recognition backbone (IBasicBlock).
//!
//! Parameter names follow the reference exactly (`conv1`, `bn1`, `prelu`,
//! `layer{1..4}.{i}.{bn1,conv1,bn2,prelu,conv2,bn3,downsample.0,downsample.1}`, `bn2`, `fc`,
//! `features`). Input is `[B, 3, 112, 112]` in [-1, 1]; the output is the raw embedding of the
//! `features` BatchNorm1d (not normalised). BatchNorm runs on running statistics at
//! inference (`train = false`) and on batch statistics, updating the running ones, in
//! training, so the same model serves the FR-training code.

use crate::checkpoint::{build_checked, load_state_dict};
use crate::kernels::math::ChannelAffine;
use crate::kernels::tensor_values;
use crate::nn::layers::{conv2d_no_bias, linear, Conv2d, Linear};
use candle_core::{DType, Device, Module, ModuleT, Result, Tensor, D};
use candle_nn::{batch_norm, prelu, BatchNorm, BatchNormConfig, Conv2dConfig, PReLU, VarBuilder};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Epsilon of every BatchNorm (2d and the final BatchNorm1d `features`).
const BN_EPS: f64 = 1e-5;
/// Channels of the four stages relative to the stem width (64, 128, 256, 512 for IResNet).
const STAGE_MULTIPLIERS: [usize; 4] = [1, 2, 4, 8];

/// Architecture of an IResNet backbone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IResNetConfig {
    /// Number of IBasicBlocks in each of the four stages.
    pub layers: Vec<usize>,
    /// Embedding size (output of `fc` and `features`).
    #[serde(default = "default_num_features")]
    pub num_features: usize,
    /// Residual block type; only `"IBasicBlock"` is supported.
    #[serde(default = "default_block")]
    pub block: String,
    /// Dropout before `fc`, active only in training (the paper's FR training uses 0.4).
    #[serde(default)]
    pub dropout: f64,
    /// Channels of the stem and first stage (64 in arcface_torch; smaller for the embedded
    /// default model). Stages have `width × [1, 2, 4, 8]` channels.
    #[serde(default = "default_width")]
    pub width: usize,
    /// Input side length, a multiple of 16 (112 in arcface_torch; `fc` sees
    /// `8·width × (input_size/16)²` features).
    #[serde(default = "default_input_size")]
    pub input_size: usize,
}

fn default_width() -> usize {
    64
}

fn default_input_size() -> usize {
    112
}

fn default_num_features() -> usize {
    512
}

fn default_block() -> String {
    "IBasicBlock".to_owned()
}

impl IResNetConfig {
    fn with_layers(layers: [usize; 4]) -> Self {
        Self {
            layers: layers.to_vec(),
            num_features: default_num_features(),
            block: default_block(),
            dropout: 0.0,
            width: default_width(),
            input_size: default_input_size(),
        }
    }

    /// iresnet18: layers [2, 2, 2, 2], 512-d.
    pub fn iresnet18() -> Self {
        Self::with_layers([2, 2, 2, 2])
    }

    /// iresnet34: layers [3, 4, 6, 3], 512-d.
    pub fn iresnet34() -> Self {
        Self::with_layers([3, 4, 6, 3])
    }

    /// iresnet50: layers [3, 4, 14, 3], 512-d (the FR-training backbone of the paper).
    pub fn iresnet50() -> Self {
        Self::with_layers([3, 4, 14, 3])
    }

    /// iresnet100: layers [3, 13, 30, 3], 512-d (ElasticFace-Arc, used for contexts).
    pub fn iresnet100() -> Self {
        Self::with_layers([3, 13, 30, 3])
    }

    /// Reads the architecture off parameter shapes (`name`, `dims`): blocks per stage from
    /// the `layer{s}.{i}.` names, `width` from `conv1.weight`, `num_features` from
    /// `features.weight` and `input_size` from the input width of `fc.weight`.
    pub fn infer<'a>(shapes: impl IntoIterator<Item = (&'a str, &'a [usize])>) -> Result<Self> {
        let mut layers = [0usize; 4];
        let (mut width, mut features, mut fc_in) = (None, None, None);
        for (name, dims) in shapes {
            match name {
                "conv1.weight" => width = dims.first().copied(),
                "features.weight" => features = dims.first().copied(),
                "fc.weight" => fc_in = dims.get(1).copied(),
                _ => {}
            }
            let Some(rest) = name.strip_prefix("layer") else {
                continue;
            };
            let mut parts = rest.split('.');
            if let (Some(Ok(s @ 1..=4)), Some(Ok(i))) = (
                parts.next().map(str::parse::<usize>),
                parts.next().map(str::parse::<usize>),
            ) {
                layers[s - 1] = layers[s - 1].max(i + 1);
            }
        }
        let missing =
            |k: &str| candle_core::Error::Msg(format!("no `{k}`; not an IResNet backbone"));
        let width = width.ok_or_else(|| missing("conv1.weight"))?;
        let num_features = features.ok_or_else(|| missing("features.weight"))?;
        let fc_in = fc_in.ok_or_else(|| missing("fc.weight"))?;
        let side = ((fc_in / (8 * width).max(1)) as f64).sqrt().round() as usize;
        if side * side * 8 * width != fc_in {
            candle_core::bail!("`fc.weight` input width {fc_in} is not 8·{width}·side²");
        }
        let cfg = Self {
            layers: layers.to_vec(),
            num_features,
            width,
            input_size: side * 16,
            ..Self::iresnet18()
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a config from a JSON file (unknown keys are ignored).
    pub fn from_json_file(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: invalid IResNet config: {e}", path.display()))
    }

    /// Checks that the config describes a buildable backbone.
    pub fn validate(&self) -> Result<()> {
        if self.block != "IBasicBlock" {
            candle_core::bail!(
                "IResNet config: block {:?} is not supported (only \"IBasicBlock\")",
                self.block
            );
        }
        if self.layers.len() != 4 || self.layers.contains(&0) {
            candle_core::bail!(
                "IResNet config: layers must be four positive block counts, got {:?}",
                self.layers
            );
        }
        if self.width == 0 {
            candle_core::bail!("IResNet config: width must be positive");
        }
        if self.input_size < 16 || !self.input_size.is_multiple_of(16) {
            candle_core::bail!(
                "IResNet config: input_size must be a positive multiple of 16, got {}",
                self.input_size
            );
        }
        if self.num_features == 0 {
            candle_core::bail!("IResNet config: num_features must be positive");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            candle_core::bail!(
                "IResNet config: dropout must be in [0, 1), got {}",
                self.dropout
            );
        }
        Ok(())
    }
}

/// Inference BatchNorm (running statistics), then the PReLU if given, as one op on F32 CPU
/// tensors; candle's modules otherwise (training, other devices and dtypes).
fn bn_prelu(x: &Tensor, bn: &BatchNorm, prelu: Option<&PReLU>, train: bool) -> Result<Tensor> {
    match fused_affine(x, bn, prelu, train)? {
        Some(op) => x.contiguous()?.apply_op1_no_bwd(&op),
        None => {
            let h = bn.forward_t(x, train)?;
            match prelu {
                Some(p) => p.forward(&h),
                None => Ok(h),
            }
        }
    }
}

/// `bn(x) + residual`, in one pass where [`bn_prelu`] has its fused op.
fn bn_add(x: &Tensor, bn: &BatchNorm, residual: &Tensor, train: bool) -> Result<Tensor> {
    let plain = !residual.track_op() && residual.dtype() == DType::F32;
    match fused_affine(x, bn, None, train)? {
        Some(op) if plain && residual.dims() == x.dims() => x
            .contiguous()?
            .apply_op2_no_bwd(&residual.contiguous()?, &op),
        _ => bn_prelu(x, bn, None, train)? + residual,
    }
}

/// The inference BatchNorm and PReLU as one [`ChannelAffine`], where it applies: F32 CPU
/// tensors outside training, an affine BatchNorm and a per-channel PReLU.
fn fused_affine(
    x: &Tensor,
    bn: &BatchNorm,
    prelu: Option<&PReLU>,
    train: bool,
) -> Result<Option<ChannelAffine>> {
    let plain = |t: &Tensor| !t.track_op() && t.dtype() == DType::F32;
    let affine = bn.weight_and_bias();
    let (Some((w, b)), false) = (affine, train) else {
        return Ok(None);
    };
    let scalar_prelu = prelu.is_some_and(|p| p.is_scalar());
    if !x.device().is_cpu() || !plain(x) || !plain(w) || scalar_prelu || x.rank() < 2 {
        return Ok(None);
    }
    let (mean, var) = (
        tensor_values(bn.running_mean())?,
        tensor_values(bn.running_var())?,
    );
    let (w, b) = (tensor_values(w)?, tensor_values(b)?);
    let scale: Vec<f32> = w
        .iter()
        .zip(&var)
        .map(|(w, v)| w / (v + bn.eps() as f32).sqrt())
        .collect();
    let shift = b
        .iter()
        .zip(&mean)
        .zip(&scale)
        .map(|((b, m), a)| b - m * a)
        .collect();
    Ok(Some(ChannelAffine {
        scale,
        shift,
        prelu: prelu.map(|p| tensor_values(p.weight())).transpose()?,
    }))
}

fn bn(channels: usize, vb: VarBuilder) -> Result<BatchNorm> {
    batch_norm(channels, BatchNormConfig::from(BN_EPS), vb)
}

fn conv3x3(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    conv2d_no_bias(cin, cout, 3, cfg, vb)
}

/// The IResNet residual block: BN → 3×3 conv → BN → PReLU → 3×3 conv (stride) → BN, plus
/// the identity or a `downsample` (1×1 strided conv + BN).
#[derive(Debug, Clone)]
pub struct IBasicBlock {
    bn1: BatchNorm,
    conv1: Conv2d,
    bn2: BatchNorm,
    prelu: PReLU,
    conv2: Conv2d,
    bn3: BatchNorm,
    downsample: Option<(Conv2d, BatchNorm)>,
}

impl IBasicBlock {
    /// Builds the block from `vb`; a `downsample` branch is created when `stride != 1` or the
    /// channel count changes.
    pub fn new(vb: VarBuilder, inplanes: usize, planes: usize, stride: usize) -> Result<Self> {
        let downsample = if stride != 1 || inplanes != planes {
            let cfg = Conv2dConfig {
                stride,
                ..Default::default()
            };
            let vb_ds = vb.pp("downsample");
            Some((
                conv2d_no_bias(inplanes, planes, 1, cfg, vb_ds.pp("0"))?,
                bn(planes, vb_ds.pp("1"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            bn1: bn(inplanes, vb.pp("bn1"))?,
            conv1: conv3x3(inplanes, planes, 1, vb.pp("conv1"))?,
            bn2: bn(planes, vb.pp("bn2"))?,
            prelu: prelu(Some(planes), vb.pp("prelu"))?,
            conv2: conv3x3(planes, planes, stride, vb.pp("conv2"))?,
            bn3: bn(planes, vb.pp("bn3"))?,
            downsample,
        })
    }

    /// Applies the block; `train` selects batch statistics (and updates the running ones).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = bn_prelu(x, &self.bn1, None, train)?;
        let h = self.conv1.forward(&h)?;
        let h = bn_prelu(&h, &self.bn2, Some(&self.prelu), train)?;
        let h = self.conv2.forward(&h)?;
        let identity = match &self.downsample {
            Some((conv, norm)) => bn_prelu(&conv.forward(x)?, norm, None, train)?,
            None => x.clone(),
        };
        bn_add(&h, &self.bn3, &identity, train)
    }
}

/// The IResNet backbone.
#[derive(Debug, Clone)]
pub struct IResNet {
    conv1: Conv2d,
    bn1: BatchNorm,
    prelu: PReLU,
    layers: Vec<Vec<IBasicBlock>>,
    bn2: BatchNorm,
    fc: Linear,
    features: BatchNorm,
    cfg: IResNetConfig,
}

impl IResNet {
    /// Builds the backbone from `vb` with the reference's parameter names.
    pub fn new(vb: VarBuilder, cfg: &IResNetConfig) -> Result<Self> {
        cfg.validate()?;
        let stage_channels = STAGE_MULTIPLIERS.map(|m| m * cfg.width);
        let mut inplanes = stage_channels[0];
        let conv1 = conv3x3(3, inplanes, 1, vb.pp("conv1"))?;
        let bn1 = bn(inplanes, vb.pp("bn1"))?;
        let prelu_stem = prelu(Some(inplanes), vb.pp("prelu"))?;
        let mut layers = Vec::with_capacity(4);
        for (stage, (&planes, &count)) in stage_channels.iter().zip(&cfg.layers).enumerate() {
            let vb_stage = vb.pp(format!("layer{}", stage + 1));
            let mut blocks = Vec::with_capacity(count);
            for i in 0..count {
                let stride = if i == 0 { 2 } else { 1 };
                blocks.push(IBasicBlock::new(vb_stage.pp(i), inplanes, planes, stride)?);
                inplanes = planes;
            }
            layers.push(blocks);
        }
        let last = stage_channels[3];
        let final_size = cfg.input_size / 16;
        Ok(Self {
            conv1,
            bn1,
            prelu: prelu_stem,
            layers,
            bn2: bn(last, vb.pp("bn2"))?,
            fc: linear(
                last * final_size * final_size,
                cfg.num_features,
                vb.pp("fc"),
            )?,
            features: bn(cfg.num_features, vb.pp("features"))?,
            cfg: cfg.clone(),
        })
    }

    /// The architecture this model was built with.
    pub fn config(&self) -> &IResNetConfig {
        &self.cfg
    }

    /// Side length of the square input this model expects.
    pub fn input_size(&self) -> usize {
        self.cfg.input_size
    }

    /// Raw (unnormalised) embeddings `[B, num_features]` of faces `[B, 3, 112, 112]` in
    /// [-1, 1]. `train` uses batch statistics (updating the running ones) and dropout.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let dims = x.dims();
        let size = self.cfg.input_size;
        if dims.len() != 4 || dims[1] != 3 || dims[2] != size || dims[3] != size {
            candle_core::bail!("IResNet expects input [B, 3, {size}, {size}], got {dims:?}");
        }
        if train && dims[0] < 2 {
            candle_core::bail!("IResNet training needs a batch of at least 2 for BatchNorm");
        }
        let mut h = self.conv1.forward(x)?;
        h = bn_prelu(&h, &self.bn1, Some(&self.prelu), train)?;
        for stage in &self.layers {
            for block in stage {
                h = block.forward_t(&h, train)?;
            }
        }
        h = bn_prelu(&h, &self.bn2, None, train)?.flatten_from(1)?;
        if train && self.cfg.dropout > 0.0 {
            h = candle_nn::ops::dropout(&h, self.cfg.dropout as f32)?;
        }
        let h = self.fc.forward(&h)?;
        self.features.forward_t(&h, train)
    }

    /// Inference forward pass: raw embedding `[B, num_features]` (not normalised).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }

    /// `forward(x) + forward(flip_w(x))`, the evaluation embedding before normalisation.
    pub fn embed_flip_sum(&self, x: &Tensor) -> Result<Tensor> {
        let flipped = x.flip(&[3])?;
        self.forward(x)? + self.forward(&flipped)?
    }

    /// Loads a backbone state dict (`.pth`/`.pt` torch zip or safetensors) in F32. A
    /// DataParallel `module.` prefix is removed and BatchNorm `num_batches_tracked` counters
    /// are dropped; every other key must match the config exactly.
    pub fn load(
        path: impl AsRef<Path>,
        cfg: &IResNetConfig,
        device: &Device,
    ) -> anyhow::Result<Self> {
        Self::load_or_infer(path, Some(cfg), device)
    }

    /// Like [`IResNet::load`]; without `cfg` the architecture (blocks per stage, width,
    /// input size, embedding size) is read off the weights ([`IResNetConfig::infer`]).
    pub fn load_or_infer(
        path: impl AsRef<Path>,
        cfg: Option<&IResNetConfig>,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let mut state = load_state_dict(path)?.strip_prefix("module.");
        state
            .tensors
            .retain(|k, _| !k.ends_with(".num_batches_tracked"));
        let inferred;
        let cfg = match cfg {
            Some(c) => c,
            None => {
                inferred =
                    IResNetConfig::infer(state.tensors.iter().map(|(k, v)| (k.as_str(), v.dims())))
                        .map_err(|e| {
                            anyhow::anyhow!("{}: {e} (pass its config file)", path.display())
                        })?;
                &inferred
            }
        };
        build_checked(&state, DType::F32, device, |vb| Self::new(vb, cfg))
    }
}

impl ModuleT for IResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        IResNet::forward_t(self, xs, train)
    }
}

/// Whether a parameter name is a BatchNorm running statistic (a buffer, not a trainable
/// weight); useful to keep them out of an optimiser built from a `VarMap`.
pub fn is_running_stat(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

/// L2-normalises embeddings along the last dimension (`x / max(‖x‖, 1e-12)`).
pub fn normalise(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12f64, f64::MAX)?;
    x.broadcast_div(&norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::parameter_specs;
    use crate::testutil::fixture;
    use candle_nn::VarMap;
    use std::collections::HashMap;

    use crate::testutil::max_abs_diff as max_abs;

    fn fixtures() -> Option<(IResNetConfig, std::path::PathBuf, HashMap<String, Tensor>)> {
        let cfg = fixture("iresnet_tiny_config.json")?;
        let weights = fixture("iresnet_tiny_backbone.pth")?;
        let io = fixture("iresnet_tiny_io.safetensors")?;
        Some((
            IResNetConfig::from_json_file(cfg).unwrap(),
            weights,
            candle_core::safetensors::load(io, &Device::Cpu).unwrap(),
        ))
    }

    #[test]
    fn matches_reference_embeddings() {
        let Some((cfg, weights, io)) = fixtures() else {
            return;
        };
        assert_eq!(cfg.layers, vec![1, 1, 1, 1]);
        assert_eq!(cfg.num_features, 64);
        let model = IResNet::load(&weights, &cfg, &Device::Cpu).unwrap();
        let image = &io["image"];
        let emb = model.forward(image).unwrap();
        let emb_flip = model.forward(&image.flip(&[3]).unwrap()).unwrap();
        let sum = model.embed_flip_sum(image).unwrap();
        let want_sum = (&io["embedding"] + &io["embedding_of_flipped"]).unwrap();
        let (e, ef, es) = (
            max_abs(&emb, &io["embedding"]),
            max_abs(&emb_flip, &io["embedding_of_flipped"]),
            max_abs(&sum, &want_sum),
        );
        eprintln!("iresnet max abs err: embedding {e:e}, flipped {ef:e}, flip-sum {es:e}");
        assert!(e <= 1e-4 && ef <= 1e-4 && es <= 2e-4, "{e} {ef} {es}");
    }

    #[test]
    fn normalise_gives_unit_rows() {
        let x = Tensor::new(&[[3f32, 4.], [0., 0.]], &Device::Cpu).unwrap();
        let n = normalise(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(n, vec![vec![0.6, 0.8], vec![0., 0.]]);
    }

    #[test]
    fn parameter_names_follow_reference() {
        let cfg = IResNetConfig::iresnet50();
        let specs = parameter_specs(|vb| IResNet::new(vb, &cfg)).unwrap();
        let find = |n: &str| specs.iter().find(|s| s.name == n).map(|s| s.shape.clone());
        assert_eq!(find("conv1.weight"), Some(vec![64, 3, 3, 3]));
        assert_eq!(find("prelu.weight"), Some(vec![64]));
        assert_eq!(
            find("layer1.0.downsample.0.weight"),
            Some(vec![64, 64, 1, 1])
        );
        assert_eq!(find("layer1.0.downsample.1.running_var"), Some(vec![64]));
        assert_eq!(find("layer3.13.conv2.weight"), Some(vec![256, 256, 3, 3]));
        assert_eq!(find("layer3.13.downsample.0.weight"), None);
        assert_eq!(find("layer3.14.bn1.weight"), None);
        assert_eq!(find("fc.weight"), Some(vec![512, 512 * 49]));
        assert_eq!(find("features.running_mean"), Some(vec![512]));
        assert_eq!(find("features.num_batches_tracked"), None);
        let blocks = specs
            .iter()
            .filter(|s| s.name.ends_with(".bn3.weight"))
            .count();
        assert_eq!(blocks, 3 + 4 + 14 + 3);
    }

    #[test]
    fn mismatched_config_names_key_and_both_shapes() {
        let Some((cfg, weights, _)) = fixtures() else {
            return;
        };
        let cfg = IResNetConfig {
            num_features: 128,
            ..cfg
        };
        let err = IResNet::load(&weights, &cfg, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(!err.contains('\n'), "{err}");
        assert!(
            err.contains("`fc.weight` checkpoint [64, 25088] vs config [128, 25088]"),
            "{err}"
        );
        let deeper = IResNetConfig {
            layers: vec![1, 2, 1, 1],
            num_features: 64,
            ..IResNetConfig::iresnet18()
        };
        let err = IResNet::load(&weights, &deeper, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing") && err.contains("`layer2.1."),
            "{err}"
        );
    }

    #[test]
    fn bad_configs_and_inputs_are_errors() {
        let bad = IResNetConfig {
            layers: vec![2, 2, 2],
            ..IResNetConfig::iresnet18()
        };
        assert!(parameter_specs(|vb| IResNet::new(vb, &bad)).is_err());
        let bad = IResNetConfig {
            block: "Bottleneck".into(),
            ..IResNetConfig::iresnet18()
        };
        assert!(parameter_specs(|vb| IResNet::new(vb, &bad)).is_err());
        let cfg = IResNetConfig {
            layers: vec![1, 1, 1, 1],
            num_features: 8,
            ..IResNetConfig::iresnet18()
        };
        let model = IResNet::new(VarBuilder::zeros(DType::F32, &Device::Cpu), &cfg).unwrap();
        let wrong = Tensor::zeros((1, 3, 128, 128), DType::F32, &Device::Cpu).unwrap();
        assert!(model.forward(&wrong).is_err());
        let one = Tensor::zeros((1, 3, 112, 112), DType::F32, &Device::Cpu).unwrap();
        assert!(model.forward_t(&one, true).is_err());
        let odd = IResNetConfig {
            input_size: 100,
            ..cfg.clone()
        };
        assert!(parameter_specs(|vb| IResNet::new(vb, &odd)).is_err());
    }

    /// A narrow backbone on small inputs: stage widths scale with `width` and `fc` is
    /// sized for `input_size / 16`.
    #[test]
    fn narrow_small_input_variant_has_scaled_shapes() {
        let cfg: IResNetConfig = serde_json::from_str(
            r#"{"layers":[1,1,1,1],"num_features":32,"width":16,"input_size":64}"#,
        )
        .unwrap();
        let specs = parameter_specs(|vb| IResNet::new(vb, &cfg)).unwrap();
        let find = |n: &str| specs.iter().find(|s| s.name == n).map(|s| s.shape.clone());
        assert_eq!(find("conv1.weight"), Some(vec![16, 3, 3, 3]));
        assert_eq!(find("layer4.0.conv2.weight"), Some(vec![128, 128, 3, 3]));
        assert_eq!(find("fc.weight"), Some(vec![32, 128 * 4 * 4]));
        let model = IResNet::new(VarBuilder::zeros(DType::F32, &Device::Cpu), &cfg).unwrap();
        assert_eq!(model.input_size(), 64);
        let x = Tensor::zeros((2, 3, 64, 64), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(model.forward(&x).unwrap().dims(), &[2, 32]);
        let big = Tensor::zeros((2, 3, 112, 112), DType::F32, &Device::Cpu).unwrap();
        assert!(model.forward(&big).is_err());
    }

    #[test]
    fn every_trainable_weight_gets_a_gradient() {
        let device = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let cfg = IResNetConfig {
            layers: vec![1, 1, 1, 1],
            num_features: 16,
            dropout: 0.4,
            ..IResNetConfig::iresnet18()
        };
        let model = IResNet::new(vb, &cfg).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 3, 112, 112), &device).unwrap();
        let before = varmap.data().lock().unwrap()["bn1.running_mean"]
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap();
        let target = Tensor::randn(0f32, 1., (2, 16), &device).unwrap();
        let out = model.forward_t(&x, true).unwrap();
        let loss = (out - target).unwrap().sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        let data = varmap.data().lock().unwrap();
        let mut missing = Vec::new();
        for (name, var) in data.iter() {
            if is_running_stat(name) {
                continue;
            }
            match grads.get(var.as_tensor()) {
                Some(g)
                    if g.sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        > 0.0 => {}
                _ => missing.push(name.clone()),
            }
        }
        assert!(missing.is_empty(), "no gradient for {missing:?}");
        let after = data["bn1.running_mean"]
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap();
        assert_ne!(
            before, after,
            "training mode must update running statistics"
        );
    }
}
