//! The IDiff-Face conditional U-Net ("CA" variant): an ε-prediction network on VQ latents,
//! conditioned on an identity context through cross-attention.
//!
//! Parameter names mirror the reference checkpoints (`image_proj`, `time_emb`, `context_emb`,
//! `down.N`, `middle.{res1,attn,res2}`, `up.N`, `norm`, `final`).

use candle_core::{DType, Module, Result, Tensor};
// `Conv2d` with a fast CPU training path; identical to candle's at inference.
use crate::checkpoint::StateDict;
use crate::kernels::attention::AttentionWeights;
use crate::kernels::norm::Epilogue;
use crate::kernels::PackedCache;
use crate::nn::layers::{conv2d, gelu_erf, group_norm, silu, Conv2d, GroupNorm};
use crate::nn::layers::{conv_transpose2d, ConvTranspose2d};
use crate::nn::layers::{current_kernels, with_kernels};
use crate::nn::layers::{fused_attention, fused_channels_linear};
use crate::nn::layers::{linear, Linear};
use crate::nn::layers::{packed_inference, residual_add};
use candle_nn::{conv1d, Conv1d, Conv2dConfig};
use candle_nn::{ConvTranspose2dConfig, VarBuilder};
use serde::{Deserialize, Serialize};

/// Architecture hyper-parameters, with the reference's key names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Channels after `image_proj`.
    pub initial_channels: usize,
    /// Per-level channel multipliers, applied cumulatively.
    pub channel_multipliers: Vec<usize>,
    /// Whether each level has attention blocks.
    pub is_attention: Vec<bool>,
    /// Number of heads; -1 means `channels / attention_head_channels`.
    #[serde(default = "default_heads")]
    pub attention_heads: i64,
    /// Channels per head when `attention_heads` is -1.
    #[serde(default = "default_head_channels")]
    pub attention_head_channels: usize,
    /// Residual blocks per level.
    #[serde(default = "default_blocks")]
    pub n_blocks_per_resolution: usize,
    /// Width of the identity context fed to `context_emb` (the FR embedding size).
    #[serde(default = "default_context_input")]
    pub context_input_channels: usize,
    /// Width of the projected context.
    #[serde(default = "default_context_channels")]
    pub context_channels: usize,
    /// Latent channels (input and output).
    #[serde(default = "default_input_channels")]
    pub input_channels: usize,
    /// Training-time CPD probability (informational at inference).
    #[serde(default)]
    pub context_dropout_probability: f64,
    /// Conditioning type; only "CA" is supported.
    #[serde(default = "default_condition")]
    pub condition_type: String,
    /// Spatial size of the latent.
    #[serde(default = "default_latent_size")]
    pub latent_size: usize,
    /// What the network predicts; the samplers always receive ε.
    #[serde(default)]
    pub prediction: Prediction,
}

/// The network's output parameterisation. The reference (and the released weights) predict
/// ε; the project's default model may predict v = √ᾱ·ε − √(1−ᾱ)·x₀ (Salimans & Ho 2022),
/// which learns the high-noise steps (where the face layout is decided) far faster on a
/// small budget. Samplers convert v back to ε = √ᾱ·v + √(1−ᾱ)·x_t.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prediction {
    /// The noise ε (the reference).
    #[default]
    Eps,
    /// The velocity v.
    V,
}

impl std::str::FromStr for Prediction {
    type Err = String;

    /// Parses `eps` or `v` (the names `unet.json` records).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "eps" => Ok(Self::Eps),
            "v" => Ok(Self::V),
            other => Err(format!("unknown prediction {other:?} (eps, v)")),
        }
    }
}

fn default_heads() -> i64 {
    -1
}
fn default_head_channels() -> usize {
    32
}
fn default_blocks() -> usize {
    2
}
fn default_context_input() -> usize {
    512
}
fn default_context_channels() -> usize {
    256
}
fn default_input_channels() -> usize {
    3
}
fn default_condition() -> String {
    "CA".to_owned()
}
fn default_latent_size() -> usize {
    32
}

impl UNetConfig {
    /// The configuration of the released IDiff-Face models (CPD25 / CPD50).
    pub fn released() -> Self {
        Self {
            initial_channels: 96,
            channel_multipliers: vec![1, 2, 2, 2],
            is_attention: vec![false, true, true, true],
            attention_heads: -1,
            attention_head_channels: 32,
            n_blocks_per_resolution: 2,
            context_input_channels: 512,
            context_channels: 256,
            input_channels: 3,
            context_dropout_probability: 0.25,
            condition_type: "CA".to_owned(),
            latent_size: 32,
            prediction: Prediction::Eps,
        }
    }

    /// Checks the configuration for values the architecture cannot honour.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.condition_type == "CA",
            "condition_type {:?} is not supported (only \"CA\")",
            self.condition_type
        );
        anyhow::ensure!(
            !self.channel_multipliers.is_empty()
                && self.channel_multipliers.len() == self.is_attention.len(),
            "channel_multipliers ({}) and is_attention ({}) must have the same non-zero length",
            self.channel_multipliers.len(),
            self.is_attention.len()
        );
        anyhow::ensure!(
            self.initial_channels.is_multiple_of(32),
            "initial_channels must be a multiple of 32 (GroupNorm)"
        );
        anyhow::ensure!(
            self.context_channels.is_multiple_of(32),
            "context_channels must be a multiple of 32 (GroupNorm)"
        );
        anyhow::ensure!(
            self.attention_head_channels > 0,
            "attention_head_channels must be positive"
        );
        Ok(())
    }

    /// Channels of each resolution level (the multipliers applied cumulatively).
    pub fn level_channels(&self) -> Vec<usize> {
        let mut c = self.initial_channels;
        self.channel_multipliers
            .iter()
            .map(|m| {
                c *= m;
                c
            })
            .collect()
    }

    fn heads(&self, channels: usize) -> usize {
        if self.attention_heads < 0 {
            (channels / self.attention_head_channels).max(1)
        } else {
            self.attention_heads as usize
        }
    }

    /// Width of the time embedding.
    pub fn time_channels(&self) -> usize {
        self.initial_channels * 4
    }
}

/// Largest batch one CPU forward processes at once (see `forward_projected`).
pub const CPU_MICRO_BATCH: usize = 32;

/// Largest micro-batch of a narrow network, whose micro-batches run in parallel.
pub const NARROW_MICRO_BATCH: usize = 8;

/// Number of tokens the projected context is expanded into by `c_proj_in`.
pub const CONTEXT_TOKENS: usize = 32;

const GN_EPS: f64 = 1e-5;

fn conv3(vb: VarBuilder, cin: usize, cout: usize, stride: usize) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    conv2d(cin, cout, 3, cfg, vb)
}

fn conv1x1(vb: VarBuilder, cin: usize, cout: usize) -> Result<Conv2d> {
    conv2d(cin, cout, 1, Default::default(), vb)
}

fn gn(vb: VarBuilder, channels: usize) -> Result<GroupNorm> {
    group_norm(32, channels, GN_EPS, vb)
}

/// Sinusoidal time embedding followed by `lin1` → SiLU → `lin2`.
#[derive(Debug, Clone)]
struct TimeEmbedding {
    lin1: Linear,
    lin2: Linear,
    half: usize,
}

impl TimeEmbedding {
    fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        let c = cfg.initial_channels;
        Ok(Self {
            lin1: linear(c, cfg.time_channels(), vb.pp("lin1"))?,
            lin2: linear(cfg.time_channels(), cfg.time_channels(), vb.pp("lin2"))?,
            half: c / 2,
        })
    }

    /// `t`: integer steps, shape (B,).
    fn forward(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        let dev = t.device();
        let half = self.half;
        let freqs: Vec<f32> = (0..half)
            .map(|k| (-(10000f64.ln()) * k as f64 / half as f64).exp() as f32)
            .collect();
        let freqs = Tensor::from_vec(freqs, (1, half), dev)?;
        let t = t.to_dtype(DType::F32)?.unsqueeze(1)?;
        let args = t.broadcast_mul(&freqs)?;
        let emb = Tensor::cat(&[args.cos()?, args.sin()?], 1)?.to_dtype(dtype)?;
        self.lin2
            .forward_rows(&silu(&self.lin1.forward_rows(&emb)?)?)
    }
}

/// Residual block with time-modulated GroupNorm (`scale_emb`, `shift_emb`).
#[derive(Debug, Clone)]
struct ResidualBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb: Linear,
    scale_emb: Linear,
    shift_emb: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResidualBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize, time_channels: usize) -> Result<Self> {
        let shortcut = if cin != cout {
            Some(conv1x1(vb.pp("shortcut"), cin, cout)?)
        } else {
            None
        };
        Ok(Self {
            norm1: gn(vb.pp("norm1"), cin)?,
            conv1: conv3(vb.pp("conv1"), cin, cout, 1)?,
            time_emb: linear(time_channels, cout, vb.pp("time_emb.1"))?,
            scale_emb: linear(cout, cout, vb.pp("scale_emb"))?,
            shift_emb: linear(cout, cout, vb.pp("shift_emb"))?,
            norm2: gn(vb.pp("norm2.norm"), cout)?,
            conv2: conv3(vb.pp("conv2"), cout, cout, 1)?,
            shortcut,
        })
    }

    fn forward(&self, x: &Tensor, t_emb: &Tensor) -> Result<Tensor> {
        let then_silu = Epilogue {
            modulation: None,
            silu: true,
        };
        let h = self
            .conv1
            .forward(&self.norm1.forward_with(x, &then_silu)?)?;
        let e = self.time_emb.forward_rows(&silu(t_emb)?)?;
        let modulated = Epilogue {
            modulation: Some((
                self.scale_emb.forward_rows(&e)?,
                self.shift_emb.forward_rows(&e)?,
            )),
            silu: true,
        };
        let h = self
            .conv2
            .forward(&self.norm2.forward_with(&h, &modulated)?)?;
        match &self.shortcut {
            Some(s) => residual_add(&h, &s.forward(x)?),
            None => residual_add(&h, x),
        }
    }
}

/// Multi-head attention with 1×1 `Conv1d` projections on (B, C, N) sequences.
#[derive(Debug, Clone)]
struct Attention {
    to_q: Conv1d,
    to_k: Conv1d,
    to_v: Conv1d,
    proj_out: Conv1d,
    heads: usize,
    packed: PackedCache<AttentionWeights>,
}

impl Attention {
    fn new(vb: VarBuilder, channels: usize, kv_channels: usize, heads: usize) -> Result<Self> {
        let c = Default::default();
        Ok(Self {
            to_q: conv1d(channels, channels, 1, c, vb.pp("to_q"))?,
            to_k: conv1d(kv_channels, channels, 1, c, vb.pp("to_k"))?,
            to_v: conv1d(kv_channels, channels, 1, c, vb.pp("to_v"))?,
            proj_out: conv1d(channels, channels, 1, c, vb.pp("proj_out"))?,
            heads,
            packed: PackedCache::default(),
        })
    }

    /// The packed form of the four projections.
    fn pack(&self) -> Result<AttentionWeights> {
        fn p(c: &Conv1d) -> Result<(&Tensor, &Tensor)> {
            let bias = c.bias().ok_or_else(|| {
                candle_core::Error::Msg("attention projection without bias".into())
            })?;
            Ok((c.weight(), bias))
        }
        AttentionWeights::new(
            p(&self.to_q)?,
            p(&self.to_k)?,
            p(&self.to_v)?,
            p(&self.proj_out)?,
            self.heads,
        )
    }

    /// `x`: (B, C, Nq); `kv`: (B, Ckv, Nk). Returns (B, C, Nq).
    fn forward(&self, x: &Tensor, kv: &Tensor) -> Result<Tensor> {
        let weight = self.to_q.weight();
        if packed_inference(x, weight) && !kv.track_op() && kv.dtype() == DType::F32 {
            return self
                .packed
                .with(weight, || self.pack(), |p| p.forward(x, kv));
        }
        let (b, c, nq) = x.dims3()?;
        let nk = kv.dim(2)?;
        let d = c / self.heads;
        let scale = 1.0 / (d as f64).sqrt().sqrt();
        let dtype = x.dtype();
        // (B*h, d, N)
        let q = project(&self.to_q, x)?.reshape((b * self.heads, d, nq))?;
        let k = project(&self.to_k, kv)?.reshape((b * self.heads, d, nk))?;
        let v = project(&self.to_v, kv)?.reshape((b * self.heads, d, nk))?;
        if let Some(out) = fused_attention(&q, &k, &v, scale * scale) {
            return project(&self.proj_out, &out?.reshape((b, c, nq))?);
        }
        let (q, k) = ((q * scale)?, (k * scale)?);
        // weights (B*h, Nq, Nk) = qᵀk, softmax over keys in f32.
        let w = q.transpose(1, 2)?.contiguous()?.matmul(&k.contiguous()?)?;
        let w = w.to_dtype(DType::F32)?;
        // `softmax_last_dim` has no backward pass: when the weights are being trained (the
        // scores track an op back to a `Var`), use the differentiable `softmax` instead.
        // Loaded checkpoints hold plain tensors, so inference numerics are unchanged.
        let w = if w.track_op() {
            candle_nn::ops::softmax(&w, candle_core::D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&w)?
        }
        .to_dtype(dtype)?;
        // out (B*h, d, Nq) = v · wᵀ
        let out = v.contiguous()?.matmul(&w.transpose(1, 2)?.contiguous()?)?;
        let out = out.reshape((b, c, nq))?;
        project(&self.proj_out, &out)
    }
}

/// A 1×1 `Conv1d` projection of `(B, C, N)`: the fused training convolution when a gradient
/// is tracked on the CPU, a batched matmul for other training (candle 0.11's `conv1d`
/// backward is wrong for batches of more than one sequence), candle's `Conv1d` at inference.
fn project(conv: &Conv1d, x: &Tensor) -> Result<Tensor> {
    if let Some(y) = fused_channels_linear(x, conv.weight(), conv.bias()) {
        return y;
    }
    if !x.track_op() && !conv.weight().track_op() {
        return conv.forward(x);
    }
    let y = conv.weight().squeeze(2)?.broadcast_matmul(x)?;
    match conv.bias() {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1))?),
        None => Ok(y),
    }
}

/// Self-attention, cross-attention on the context tokens and a feed-forward, sharing one
/// GroupNorm (`x_norm`), between `x_proj_in` and `x_proj_out`.
#[derive(Debug, Clone)]
struct AttentionBlock {
    x_proj_in: Conv2d,
    x_proj_out: Conv2d,
    x_norm: GroupNorm,
    self_attention: Attention,
    c_proj_in: Linear,
    c_norm: GroupNorm,
    cross_attention: Attention,
    ff0: Linear,
    ff2: Linear,
    context_channels: usize,
}

impl AttentionBlock {
    fn new(vb: VarBuilder, channels: usize, cfg: &UNetConfig) -> Result<Self> {
        let heads = cfg.heads(channels);
        let cc = cfg.context_channels;
        Ok(Self {
            x_proj_in: conv1x1(vb.pp("x_proj_in"), channels, channels)?,
            x_proj_out: conv1x1(vb.pp("x_proj_out"), channels, channels)?,
            x_norm: gn(vb.pp("x_norm"), channels)?,
            self_attention: Attention::new(vb.pp("self_attention"), channels, channels, heads)?,
            c_proj_in: linear(cc, cc * CONTEXT_TOKENS, vb.pp("c_proj_in"))?,
            c_norm: gn(vb.pp("c_norm"), cc)?,
            cross_attention: Attention::new(vb.pp("cross_attention"), channels, cc, heads)?,
            ff0: linear(channels, channels * 4, vb.pp("ff.0"))?,
            ff2: linear(channels * 4, channels, vb.pp("ff.2"))?,
            context_channels: cc,
        })
    }

    /// `x`: (B, C, H, W); `c`: projected context (B, context_channels).
    fn forward(&self, x: &Tensor, c: &Tensor) -> Result<Tensor> {
        let (b, ch, h, w) = x.dims4()?;
        // Token j, feature n sits at index n*32 + j: a (B, features, tokens) view.
        let ctx =
            self.c_proj_in
                .forward_rows(c)?
                .reshape((b, self.context_channels, CONTEXT_TOKENS))?;
        let ctx = self.c_norm.forward(&ctx)?;
        let x_in = x;
        let x = self.x_proj_in.forward(x)?.reshape((b, ch, h * w))?;
        let n = self.x_norm.forward(&x)?;
        let x = residual_add(&self.self_attention.forward(&n, &n)?, &x)?;
        let n = self.x_norm.forward(&x)?;
        let x = residual_add(&self.cross_attention.forward(&n, &ctx)?, &x)?;
        // The feed-forward on every position, in (B, C, HW) layout.
        let n = self.x_norm.forward(&x)?;
        let f = self
            .ff2
            .forward_channels(&gelu_erf(&self.ff0.forward_channels(&n)?)?)?;
        let x = residual_add(&f, &x)?;
        let x = self.x_proj_out.forward(&x.reshape((b, ch, h, w))?)?;
        residual_add(&x, x_in)
    }
}

/// One entry of the `down` or `up` module lists.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // built once; boxing would only add indirection
enum Stage {
    Block {
        res: ResidualBlock,
        attn: Option<AttentionBlock>,
    },
    Down(Conv2d),
    Up(ConvTranspose2d),
}

impl Stage {
    fn block(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        attn: bool,
        cfg: &UNetConfig,
    ) -> Result<Self> {
        let res = ResidualBlock::new(vb.pp("res"), cin, cout, cfg.time_channels())?;
        let attn = if attn {
            Some(AttentionBlock::new(vb.pp("attn"), cout, cfg)?)
        } else {
            None
        };
        Ok(Self::Block { res, attn })
    }

    fn forward(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<Tensor> {
        match self {
            Self::Block { res, attn } => {
                let x = res.forward(x, t)?;
                match attn {
                    Some(a) => a.forward(&x, c),
                    None => Ok(x),
                }
            }
            Self::Down(conv) => conv.forward(x),
            Self::Up(conv) => conv.forward(x),
        }
    }
}

/// The conditional U-Net.
#[derive(Debug, Clone)]
pub struct ConditionalUNet {
    image_proj: Conv2d,
    time_emb: TimeEmbedding,
    context_emb: Linear,
    down: Vec<Stage>,
    middle_res1: ResidualBlock,
    middle_attn: AttentionBlock,
    middle_res2: ResidualBlock,
    up: Vec<Stage>,
    norm: GroupNorm,
    final_conv: Conv2d,
    config: UNetConfig,
    dtype: DType,
}

impl ConditionalUNet {
    /// Builds the network; parameter names follow the reference checkpoints.
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        let chans = cfg.level_channels();
        let levels = chans.len();
        let nb = cfg.n_blocks_per_resolution;
        let image_proj = conv3(
            vb.pp("image_proj"),
            cfg.input_channels,
            cfg.initial_channels,
            1,
        )?;
        let time_emb = TimeEmbedding::new(vb.pp("time_emb"), cfg)?;
        let context_emb = linear(
            cfg.context_input_channels,
            cfg.context_channels,
            vb.pp("context_emb"),
        )?;

        let mut down = Vec::new();
        let mut cin = cfg.initial_channels;
        for (level, &cout) in chans.iter().enumerate() {
            for _ in 0..nb {
                let i = down.len();
                down.push(Stage::block(
                    vb.pp(format!("down.{i}")),
                    cin,
                    cout,
                    cfg.is_attention[level],
                    cfg,
                )?);
                cin = cout;
            }
            if level + 1 < levels {
                let i = down.len();
                down.push(Stage::Down(conv3(
                    vb.pp(format!("down.{i}.conv")),
                    cin,
                    cin,
                    2,
                )?));
            }
        }

        let tc = cfg.time_channels();
        let middle_res1 = ResidualBlock::new(vb.pp("middle.res1"), cin, cin, tc)?;
        let middle_attn = AttentionBlock::new(vb.pp("middle.attn"), cin, cfg)?;
        let middle_res2 = ResidualBlock::new(vb.pp("middle.res2"), cin, cin, tc)?;

        let mut up = Vec::new();
        let mut cur = cin;
        for level in (0..levels).rev() {
            let cout = chans[level];
            for _ in 0..nb {
                let i = up.len();
                up.push(Stage::block(
                    vb.pp(format!("up.{i}")),
                    cur + cout,
                    cout,
                    cfg.is_attention[level],
                    cfg,
                )?);
                cur = cout;
            }
            // The last block of a level also consumes the skip from the level below.
            let skip = if level > 0 {
                chans[level - 1]
            } else {
                cfg.initial_channels
            };
            let reduced = cout / cfg.channel_multipliers[level];
            let i = up.len();
            up.push(Stage::block(
                vb.pp(format!("up.{i}")),
                cur + skip,
                reduced,
                cfg.is_attention[level],
                cfg,
            )?);
            cur = reduced;
            if level > 0 {
                let i = up.len();
                let tcfg = ConvTranspose2dConfig {
                    padding: 1,
                    stride: 2,
                    ..Default::default()
                };
                up.push(Stage::Up(conv_transpose2d(
                    cur,
                    cur,
                    4,
                    tcfg,
                    vb.pp(format!("up.{i}.conv")),
                )?));
            }
        }
        let norm = gn(vb.pp("norm"), cur)?;
        let final_conv = conv3(vb.pp("final"), cur, cfg.input_channels, 1)?;
        Ok(Self {
            image_proj,
            time_emb,
            context_emb,
            down,
            middle_res1,
            middle_attn,
            middle_res2,
            up,
            norm,
            final_conv,
            config: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// The configuration this network was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The dtype the weights were built in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Builds the network of `cfg` from the weights in `state` (names without the
    /// `eps_model.` prefix; see [`crate::diffusion::checkpoint::load_unet`] for loading a
    /// checkpoint file). A missing, extra or misshapen weight is refused by name.
    pub fn from_state_dict(
        state: &StateDict,
        cfg: &UNetConfig,
        dtype: DType,
        device: &candle_core::Device,
    ) -> anyhow::Result<Self> {
        cfg.validate()?;
        crate::checkpoint::build_checked(state, dtype, device, |vb| Self::new(vb, cfg))
    }

    /// Projects identity contexts (B, context_input_channels) with `context_emb`.
    pub fn project_context(&self, context: &Tensor) -> Result<Tensor> {
        self.context_emb.forward_rows(context)
    }

    /// The reference's empty context: zeros of `context_channels` in place of the
    /// projected context.
    pub fn empty_context(
        &self,
        batch: usize,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        Tensor::zeros((batch, self.config.context_channels), dtype, device)
    }

    /// ε prediction from raw contexts (`None` → the empty context).
    pub fn forward(&self, x: &Tensor, t: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let c = match context {
            Some(ctx) => self.project_context(&ctx.to_dtype(x.dtype())?)?,
            None => self.empty_context(x.dim(0)?, x.dtype(), x.device())?,
        };
        self.forward_projected(x, t, &c)
    }

    /// ε prediction from already projected contexts (B, context_channels).
    ///
    /// On the CPU large batches run as micro-batches of [`CPU_MICRO_BATCH`] images, so the
    /// activations stay cache-sized while each layer's weights serve many images; a narrow
    /// network (at most 256 channels) runs its micro-batches in parallel, one thread each.
    /// Every op computes each image on its own, so the result is identical either way.
    pub fn forward_projected(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        if !x.device().is_cpu() {
            return self.forward_batch(x, t, c);
        }
        // Narrow networks have layers too small to split across threads: their batch is
        // split instead, each part on one thread.
        let threads = crate::kernels::gemm::kernel_threads();
        let narrow = self
            .config
            .level_channels()
            .last()
            .is_some_and(|&c| c <= 256);
        let parallel = narrow && threads > 1 && b > 1;
        let per_part = if parallel {
            b.div_ceil(threads).min(NARROW_MICRO_BATCH)
        } else {
            CPU_MICRO_BATCH
        };
        if b <= per_part {
            return self.forward_batch(x, t, c);
        }
        let part = |start: usize| -> Result<Tensor> {
            let n = per_part.min(b - start);
            self.forward_batch(
                &x.narrow(0, start, n)?,
                &t.narrow(0, start, n)?,
                &c.narrow(0, start, n)?,
            )
        };
        let starts: Vec<usize> = (0..b).step_by(per_part).collect();
        let parts = if parallel {
            use rayon::prelude::*;
            // The parts run on other threads: with this thread's choice of training kernels.
            let kernels = current_kernels();
            starts
                .into_par_iter()
                .map(|start| with_kernels(kernels, || part(start)))
                .collect::<Result<Vec<_>>>()?
        } else {
            starts.into_iter().map(part).collect::<Result<Vec<_>>>()?
        };
        Tensor::cat(&parts, 0)
    }

    fn forward_batch(&self, x: &Tensor, t: &Tensor, c: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let t_emb = self.time_emb.forward(t, dtype)?;
        let c = c.to_dtype(dtype)?;
        let mut x = self.image_proj.forward(x)?;
        let mut skips = vec![x.clone()];
        for stage in &self.down {
            x = stage.forward(&x, &t_emb, &c)?;
            skips.push(x.clone());
        }
        x = self.middle_res1.forward(&x, &t_emb)?;
        x = self.middle_attn.forward(&x, &c)?;
        x = self.middle_res2.forward(&x, &t_emb)?;
        for stage in &self.up {
            if !matches!(stage, Stage::Up(_)) {
                let skip = skips
                    .pop()
                    .ok_or_else(|| candle_core::Error::Msg("U-Net skip stack underflow".into()))?;
                x = Tensor::cat(&[&x, &skip], 1)?;
            }
            x = stage.forward(&x, &t_emb, &c)?;
        }
        let then_silu = Epilogue {
            modulation: None,
            silu: true,
        };
        self.final_conv
            .forward(&self.norm.forward_with(&x, &then_silu)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::schedule::Schedule;
    use crate::testutil::{fixture, fixtures_dir};
    use candle_core::Device;

    use crate::testutil::max_abs_diff;

    fn tiny_config() -> Option<UNetConfig> {
        let p = fixture("unet_tiny_config.json")?;
        Some(serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
    }

    fn check_checkpoint(name: &str) {
        let (Some(cfg), Some(w), Some(io)) = (
            tiny_config(),
            fixture(name),
            fixture("unet_tiny_io.safetensors"),
        ) else {
            return;
        };
        let dev = Device::Cpu;
        let unet = crate::diffusion::checkpoint::load_unet(
            &w,
            &cfg,
            &Schedule::reference(),
            DType::F32,
            &dev,
        )
        .unwrap();
        let io = candle_core::safetensors::load(io, &dev).unwrap();
        let eps = unet
            .forward(&io["x"], &io["t"], Some(&io["context"]))
            .unwrap();
        let err = max_abs_diff(&eps, &io["eps"]);
        assert!(err <= 1e-4, "{name}: eps max abs error {err}");
        let eps0 = unet.forward(&io["x"], &io["t"], None).unwrap();
        let err = max_abs_diff(&eps0, &io["eps_empty_context"]);
        assert!(err <= 1e-4, "{name}: eps_empty_context max abs error {err}");
    }

    #[test]
    fn parity_ema_checkpoint_with_prefix_and_buffers() {
        check_checkpoint("unet_tiny_ema_averaged_model.ckpt");
    }

    #[test]
    fn parity_bare_eps_model_checkpoint() {
        check_checkpoint("unet_tiny_eps_model_only.ckpt");
    }

    #[test]
    fn tiny_parameter_count_matches_fixture() {
        let Some(cfg) = tiny_config() else { return };
        let specs =
            crate::checkpoint::parameter_specs(|vb| ConditionalUNet::new(vb, &cfg)).unwrap();
        let n: usize = specs
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum();
        assert_eq!(n, 7_589_155);
    }

    #[test]
    fn released_config_matches_every_released_key_and_shape() {
        let Some(dir) = fixtures_dir() else {
            return;
        };
        let keys = dir.join("../reference/unet_ca_keys.txt");
        let Ok(text) = std::fs::read_to_string(&keys) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{} missing",
                keys.display()
            );
            return;
        };
        let expected: Vec<(String, Vec<usize>)> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let (name, shape) = l.split_once(' ').unwrap();
                let dims = shape
                    .trim_matches(|c| c == '(' || c == ')' || c == ' ')
                    .split(',')
                    .filter(|d| !d.trim().is_empty())
                    .map(|d| d.trim().parse().unwrap())
                    .collect();
                (name.to_owned(), dims)
            })
            .collect();
        let specs = crate::checkpoint::parameter_specs(|vb| {
            ConditionalUNet::new(vb, &UNetConfig::released())
        })
        .unwrap();
        let mut got: Vec<(String, Vec<usize>)> =
            specs.into_iter().map(|s| (s.name, s.shape)).collect();
        let mut want = expected.clone();
        got.sort();
        want.sort();
        assert_eq!(got.len(), 842);
        assert_eq!(got, want);
        let n: usize = got.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(n, 216_341_187);
    }

    #[test]
    fn weights_for_another_config_are_refused_by_name() {
        let (Some(mut cfg), Some(w)) = (tiny_config(), fixture("unet_tiny_eps_model_only.ckpt"))
        else {
            return;
        };
        cfg.context_channels = 128;
        let err = crate::diffusion::checkpoint::load_unet(
            &w,
            &cfg,
            &Schedule::reference(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("context_emb.weight` checkpoint [64, 512] vs config [128, 512]"),
            "{err}"
        );
        assert!(!err.contains('\n'));
    }
}
