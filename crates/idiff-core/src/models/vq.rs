//! The LDM "VQ-f4" first stage (CompVis taming/ldm `Encoder`, `Decoder` and
//! `VectorQuantizer` semantics) used by IDiff-Face as its latent autoencoder.
//!
//! Parameter names follow the released checkpoints exactly: the encoder file holds
//! `encoder.*` and `quant_conv.*`, the decoder file `decoder.*`, `post_quant_conv.*` and
//! `quantize.embedding.weight`. The original LDM checkpoint carries the same names behind a
//! `first_stage_model.` prefix; the loaders accept both.

use crate::checkpoint::{build_checked, load_state_dict, StateDict};
use candle_core::{DType, Device, Module, Result, Tensor, D};
// `Conv2d` with a fast CPU training path; identical to candle's at inference.
use crate::kernels::attention::AttentionWeights;
use crate::kernels::norm::Epilogue;
use crate::kernels::PackedCache;
use crate::nn::layers::{conv2d, group_norm, packed_inference, residual_add, Conv2d, GroupNorm};
use candle_nn::{Conv2dConfig, VarBuilder};
use serde::Deserialize;
use std::path::Path;

/// Number of groups of every GroupNorm in the first stage.
const NORM_GROUPS: usize = 32;
/// Epsilon of every GroupNorm in the first stage.
const NORM_EPS: f64 = 1e-6;
/// Rows of the flattened latent compared with the codebook at once (bounds memory).
const QUANTIZE_CHUNK: usize = 4096;
/// Prefix of the first-stage weights inside a full LDM checkpoint.
const LDM_PREFIX: &str = "first_stage_model.";

/// Architecture of the VQ first stage, with the key names of the reference's `ddconfig`
/// plus `n_embed` and `embed_dim`. Unknown keys are ignored; missing keys take the released
/// VQ-f4 values.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct VqConfig {
    /// Base channel count.
    pub ch: usize,
    /// Channel multiplier per resolution level.
    pub ch_mult: Vec<usize>,
    /// Residual blocks per level in the encoder (the decoder uses one more).
    pub num_res_blocks: usize,
    /// Channels of the encoder output / decoder input.
    pub z_channels: usize,
    /// Number of codebook entries.
    pub n_embed: usize,
    /// Dimension of each codebook entry (channels of the latent).
    pub embed_dim: usize,
    /// Image channels at the encoder input.
    pub in_channels: usize,
    /// Image channels at the decoder output.
    pub out_ch: usize,
    /// Whether the encoder emits mean and log-variance (KL models only; must be false here).
    pub double_z: bool,
    /// Resolutions (relative to `resolution`) that get attention blocks besides the middle.
    pub attn_resolutions: Vec<usize>,
    /// Nominal image resolution, used only to place attention blocks.
    pub resolution: usize,
    /// Dropout of the residual blocks (inactive at inference).
    pub dropout: f64,
}

impl Default for VqConfig {
    fn default() -> Self {
        Self::released()
    }
}

impl VqConfig {
    /// The released VQ-f4 first stage of the CompVis FFHQ-256 LDM used by IDiff-Face.
    pub fn released() -> Self {
        Self {
            ch: 128,
            ch_mult: vec![1, 2, 4],
            num_res_blocks: 2,
            z_channels: 3,
            n_embed: 8192,
            embed_dim: 3,
            in_channels: 3,
            out_ch: 3,
            double_z: false,
            attn_resolutions: Vec::new(),
            resolution: 256,
            dropout: 0.0,
        }
    }

    /// Reads a config from a JSON file (unknown keys are ignored).
    pub fn from_json_file(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: invalid VQ config: {e}", path.display()))
    }

    /// Downsampling factor between image and latent (`2^(levels-1)`).
    pub fn downsample_factor(&self) -> usize {
        let shift = self.ch_mult.len().saturating_sub(1);
        u32::try_from(shift)
            .ok()
            .and_then(|s| 1usize.checked_shl(s))
            .unwrap_or(usize::MAX)
    }

    /// Checks that the config describes a buildable VQ first stage.
    pub fn validate(&self) -> Result<()> {
        if self.ch_mult.is_empty() {
            candle_core::bail!("VQ config: ch_mult must not be empty");
        }
        if self.ch == 0 || self.ch_mult.contains(&0) {
            candle_core::bail!("VQ config: ch and every ch_mult entry must be positive");
        }
        if self.ch_mult.len() > 16 {
            candle_core::bail!("VQ config: at most 16 resolution levels are supported");
        }
        for &m in &self.ch_mult {
            let Some(channels) = self.ch.checked_mul(m) else {
                candle_core::bail!("VQ config: ch {} x mult {m} overflows", self.ch);
            };
            if !channels.is_multiple_of(NORM_GROUPS) {
                candle_core::bail!(
                    "VQ config: channel count {channels} (ch {} x mult {m}) is not divisible by {NORM_GROUPS} GroupNorm groups",
                    self.ch
                );
            }
        }
        if self.z_channels == 0 || self.embed_dim == 0 || self.n_embed == 0 {
            candle_core::bail!("VQ config: z_channels, embed_dim and n_embed must be positive");
        }
        if self.in_channels == 0 || self.out_ch == 0 {
            candle_core::bail!("VQ config: in_channels and out_ch must be positive");
        }
        if self.double_z {
            candle_core::bail!(
                "VQ config: double_z = true describes a KL autoencoder, not a VQ first stage"
            );
        }
        Ok(())
    }
}

/// `swish(norm(x))` in one op where the kernels allow it.
fn norm_swish(norm: &GroupNorm, x: &Tensor) -> Result<Tensor> {
    let then_silu = Epilogue {
        modulation: None,
        silu: true,
    };
    norm.forward_with(x, &then_silu)
}

fn norm(channels: usize, vb: VarBuilder) -> Result<GroupNorm> {
    group_norm(NORM_GROUPS, channels, NORM_EPS, vb)
}

fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    conv2d(cin, cout, k, cfg, vb)
}

/// Residual block: GN → swish → 3×3 conv → GN → swish → 3×3 conv, plus a 1×1
/// `nin_shortcut` when the channel count changes.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    /// Builds the block from `vb` (`norm1`, `conv1`, `norm2`, `conv2`, `nin_shortcut`).
    pub fn new(vb: VarBuilder, in_channels: usize, out_channels: usize) -> Result<Self> {
        let nin_shortcut = if in_channels != out_channels {
            Some(conv(
                in_channels,
                out_channels,
                1,
                1,
                0,
                vb.pp("nin_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: norm(in_channels, vb.pp("norm1"))?,
            conv1: conv(in_channels, out_channels, 3, 1, 1, vb.pp("conv1"))?,
            norm2: norm(out_channels, vb.pp("norm2"))?,
            conv2: conv(out_channels, out_channels, 3, 1, 1, vb.pp("conv2"))?,
            nin_shortcut,
        })
    }

    /// Applies the block to `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&norm_swish(&self.norm1, x)?)?;
        let h = self.conv2.forward(&norm_swish(&self.norm2, &h)?)?;
        match &self.nin_shortcut {
            Some(s) => residual_add(&s.forward(x)?, &h),
            None => residual_add(x, &h),
        }
    }
}

/// Single-head spatial self-attention with 1×1 convolutions `q`, `k`, `v`, `proj_out`.
#[derive(Debug, Clone)]
pub struct AttnBlock {
    norm: GroupNorm,
    q: Conv2d,
    k: Conv2d,
    v: Conv2d,
    proj_out: Conv2d,
    packed: PackedCache<AttentionWeights>,
}

impl AttnBlock {
    /// Builds the block from `vb` (`norm`, `q`, `k`, `v`, `proj_out`).
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            norm: norm(channels, vb.pp("norm"))?,
            q: conv(channels, channels, 1, 1, 0, vb.pp("q"))?,
            k: conv(channels, channels, 1, 1, 0, vb.pp("k"))?,
            v: conv(channels, channels, 1, 1, 0, vb.pp("v"))?,
            proj_out: conv(channels, channels, 1, 1, 0, vb.pp("proj_out"))?,
            packed: PackedCache::default(),
        })
    }

    /// The four 1×1 convolutions as one packed single-head attention.
    fn pack(&self) -> Result<AttentionWeights> {
        fn p(c: &Conv2d) -> Result<(&Tensor, &Tensor)> {
            let bias = c.bias().ok_or_else(|| {
                candle_core::Error::Msg("attention projection without bias".into())
            })?;
            Ok((c.weight(), bias))
        }
        AttentionWeights::new(p(&self.q)?, p(&self.k)?, p(&self.v)?, p(&self.proj_out)?, 1)
    }

    /// Applies `x + proj_out(attention(norm(x)))` to `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hn = self.norm.forward(x)?;
        if packed_inference(&hn, self.q.weight()) {
            let seq = hn.reshape((b, c, h * w))?;
            let out =
                self.packed
                    .with(self.q.weight(), || self.pack(), |p| p.forward(&seq, &seq))?;
            return residual_add(x, &out.reshape((b, c, h, w))?);
        }
        let q = self.q.forward(&hn)?.reshape((b, c, h * w))?;
        let k = self.k.forward(&hn)?.reshape((b, c, h * w))?;
        let v = self.v.forward(&hn)?.reshape((b, c, h * w))?;
        // Scores [B, HW(query), HW(key)], scaled by C^-1/2, softmax over keys.
        let q = q.transpose(1, 2)?.contiguous()?;
        let scores = (q.matmul(&k)? * (c as f64).powf(-0.5))?;
        let weights = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let out = v.matmul(&weights.transpose(1, 2)?.contiguous()?)?;
        let out = self.proj_out.forward(&out.reshape((b, c, h, w))?)?;
        x + out
    }
}

/// Encoder downsampling: zero-pad right and bottom by one, then 3×3 stride-2 conv.
#[derive(Debug, Clone)]
pub struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    /// Builds the layer from `vb` (`conv`).
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv(channels, channels, 3, 2, 0, vb.pp("conv"))?,
        })
    }

    /// Halves the spatial size of `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x
            .pad_with_zeros(D::Minus1, 0, 1)?
            .pad_with_zeros(D::Minus2, 0, 1)?;
        self.conv.forward(&x)
    }
}

/// Decoder upsampling: nearest-neighbour ×2, then 3×3 conv.
#[derive(Debug, Clone)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    /// Builds the layer from `vb` (`conv`).
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv(channels, channels, 3, 1, 1, vb.pp("conv"))?,
        })
    }

    /// Doubles the spatial size of `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward_upsampled2(x)
    }
}

/// One resolution level: residual blocks, optional attention after each, optional resampling.
#[derive(Debug, Clone)]
struct Level<R> {
    block: Vec<ResnetBlock>,
    attn: Vec<AttnBlock>,
    resample: Option<R>,
}

impl<R> Level<R> {
    fn run_blocks(&self, mut h: Tensor) -> Result<Tensor> {
        for (i, block) in self.block.iter().enumerate() {
            h = block.forward(&h)?;
            if let Some(attn) = self.attn.get(i) {
                h = attn.forward(&h)?;
            }
        }
        Ok(h)
    }
}

/// Middle of encoder and decoder: `block_1`, `attn_1`, `block_2`.
#[derive(Debug, Clone)]
pub struct MidBlock {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl MidBlock {
    /// Builds the middle from `vb` (`block_1`, `attn_1`, `block_2`).
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            block_1: ResnetBlock::new(vb.pp("block_1"), channels, channels)?,
            attn_1: AttnBlock::new(vb.pp("attn_1"), channels)?,
            block_2: ResnetBlock::new(vb.pp("block_2"), channels, channels)?,
        })
    }

    /// Applies `block_2(attn_1(block_1(x)))`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.block_1.forward(x)?;
        let h = self.attn_1.forward(&h)?;
        self.block_2.forward(&h)
    }
}

/// The taming/ldm convolutional encoder (`encoder.*`), image → `z_channels` features.
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down: Vec<Level<Downsample>>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    /// Builds the encoder from `vb` (the `encoder` prefix already applied).
    pub fn new(vb: VarBuilder, cfg: &VqConfig) -> Result<Self> {
        cfg.validate()?;
        let levels = cfg.ch_mult.len();
        let conv_in = conv(cfg.in_channels, cfg.ch, 3, 1, 1, vb.pp("conv_in"))?;
        let mut down = Vec::with_capacity(levels);
        let mut curr_res = cfg.resolution;
        let mut block_in = cfg.ch;
        for (i, &mult) in cfg.ch_mult.iter().enumerate() {
            let vb_level = vb.pp("down").pp(i);
            let block_out = cfg.ch * mult;
            let with_attn = cfg.attn_resolutions.contains(&curr_res);
            let mut block = Vec::with_capacity(cfg.num_res_blocks);
            let mut attn = Vec::new();
            for j in 0..cfg.num_res_blocks {
                block.push(ResnetBlock::new(
                    vb_level.pp("block").pp(j),
                    block_in,
                    block_out,
                )?);
                block_in = block_out;
                if with_attn {
                    attn.push(AttnBlock::new(vb_level.pp("attn").pp(j), block_in)?);
                }
            }
            let resample = if i + 1 != levels {
                curr_res /= 2;
                Some(Downsample::new(vb_level.pp("downsample"), block_in)?)
            } else {
                None
            };
            down.push(Level {
                block,
                attn,
                resample,
            });
        }
        Ok(Self {
            conv_in,
            down,
            mid: MidBlock::new(vb.pp("mid"), block_in)?,
            norm_out: norm(block_in, vb.pp("norm_out"))?,
            conv_out: conv(block_in, cfg.z_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    /// Maps images `[B, in_channels, H, W]` to features `[B, z_channels, H/f, W/f]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.down {
            h = level.run_blocks(h)?;
            if let Some(down) = &level.resample {
                h = down.forward(&h)?;
            }
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&norm_swish(&self.norm_out, &h)?)
    }
}

/// The taming/ldm convolutional decoder (`decoder.*`), `z_channels` features → image.
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    /// Indexed like the checkpoint (`up.0` is the highest resolution); run from the last.
    up: Vec<Level<Upsample>>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    /// Builds the decoder from `vb` (the `decoder` prefix already applied).
    pub fn new(vb: VarBuilder, cfg: &VqConfig) -> Result<Self> {
        cfg.validate()?;
        let levels = cfg.ch_mult.len();
        let mut block_in = cfg.ch * cfg.ch_mult[levels - 1];
        let mut curr_res = cfg.resolution / cfg.downsample_factor();
        let conv_in = conv(cfg.z_channels, block_in, 3, 1, 1, vb.pp("conv_in"))?;
        let mid = MidBlock::new(vb.pp("mid"), block_in)?;
        let mut up = Vec::with_capacity(levels);
        for i in (0..levels).rev() {
            let vb_level = vb.pp("up").pp(i);
            let block_out = cfg.ch * cfg.ch_mult[i];
            let with_attn = cfg.attn_resolutions.contains(&curr_res);
            let mut block = Vec::with_capacity(cfg.num_res_blocks + 1);
            let mut attn = Vec::new();
            for j in 0..=cfg.num_res_blocks {
                block.push(ResnetBlock::new(
                    vb_level.pp("block").pp(j),
                    block_in,
                    block_out,
                )?);
                block_in = block_out;
                if with_attn {
                    attn.push(AttnBlock::new(vb_level.pp("attn").pp(j), block_in)?);
                }
            }
            let resample = if i != 0 {
                curr_res *= 2;
                Some(Upsample::new(vb_level.pp("upsample"), block_in)?)
            } else {
                None
            };
            up.push(Level {
                block,
                attn,
                resample,
            });
        }
        up.reverse();
        Ok(Self {
            conv_in,
            mid,
            up,
            norm_out: norm(block_in, vb.pp("norm_out"))?,
            conv_out: conv(block_in, cfg.out_ch, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    /// Maps features `[B, z_channels, h, w]` to images `[B, out_ch, h*f, w*f]` (unclamped).
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(z)?;
        h = self.mid.forward(&h)?;
        for level in self.up.iter().rev() {
            h = level.run_blocks(h)?;
            if let Some(up) = &level.resample {
                h = up.forward(&h)?;
            }
        }
        self.conv_out.forward(&norm_swish(&self.norm_out, &h)?)
    }
}

/// Nearest-neighbour codebook quantiser (`quantize.embedding.weight`, `[n_embed, embed_dim]`).
#[derive(Debug, Clone)]
pub struct VectorQuantizer {
    embedding: Tensor,
    n_embed: usize,
    embed_dim: usize,
}

impl VectorQuantizer {
    /// Builds the quantiser from `vb` (the `quantize` prefix already applied).
    pub fn new(vb: VarBuilder, cfg: &VqConfig) -> Result<Self> {
        let embedding = vb.get((cfg.n_embed, cfg.embed_dim), "embedding.weight")?;
        Ok(Self {
            embedding,
            n_embed: cfg.n_embed,
            embed_dim: cfg.embed_dim,
        })
    }

    /// The codebook, `[n_embed, embed_dim]`.
    pub fn codebook(&self) -> &Tensor {
        &self.embedding
    }

    /// Index of the nearest codebook entry (squared L2 over the `embed_dim` vector) at each
    /// position of `z: [B, embed_dim, H, W]`; returns `U32 [B, H*W]`, row-major over (H, W).
    /// Ties go to the lowest index, as in the reference's `argmin`.
    pub fn indices(&self, z: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = z.dims4()?;
        if c != self.embed_dim {
            candle_core::bail!(
                "latent has {c} channels but the codebook entries have {} dimensions",
                self.embed_dim
            );
        }
        let flat = z
            .permute((0, 2, 3, 1))?
            .reshape((b * h * w, c))?
            .to_dtype(DType::F32)?;
        let codebook = self.embedding.to_dtype(DType::F32)?;
        let code_sq = codebook.sqr()?.sum(1)?.unsqueeze(0)?; // [1, n_embed]
        let code_t = codebook.t()?.contiguous()?; // [embed_dim, n_embed]
        let rows = b * h * w;
        let mut parts = Vec::with_capacity(rows.div_ceil(QUANTIZE_CHUNK));
        let mut start = 0;
        while start < rows {
            let len = QUANTIZE_CHUNK.min(rows - start);
            let zc = flat.narrow(0, start, len)?;
            // |z|^2 + |e|^2 - 2 z·e, in the reference's order of operations.
            let z_sq = zc.sqr()?.sum_keepdim(1)?; // [len, 1]
            let cross = (zc.matmul(&code_t)? * 2.0)?;
            let dist = z_sq.broadcast_add(&code_sq)?.sub(&cross)?;
            parts.push(dist.argmin(1)?);
            start += len;
        }
        Tensor::cat(&parts, 0)?.reshape((b, h * w))
    }

    /// Codebook vectors for `indices: [B, H*W]` (any integer dtype), as a latent
    /// `[B, embed_dim, H, W]`.
    pub fn lookup(&self, indices: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let (b, n) = indices.dims2()?;
        if n != h * w {
            candle_core::bail!("{n} code indices per image cannot form a {h}x{w} latent");
        }
        let idx = indices.flatten_all()?.to_dtype(DType::U32)?;
        if b * n > 0 {
            let max = idx.max(0)?.to_scalar::<u32>()? as usize;
            if max >= self.n_embed {
                candle_core::bail!(
                    "code index {max} is out of range for a codebook of {}",
                    self.n_embed
                );
            }
        }
        self.embedding
            .index_select(&idx, 0)?
            .reshape((b, h, w, self.embed_dim))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }

    /// Quantises `z: [B, embed_dim, H, W]`: returns (quantised latent, indices `U32 [B, H*W]`).
    pub fn forward(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, _, h, w) = z.dims4()?;
        let indices = self.indices(z)?;
        let quantised = self.lookup(&indices, h, w)?.to_dtype(z.dtype())?;
        Ok((quantised, indices))
    }
}

/// Encoder half of the first stage: `quant_conv(encoder(x))`.
#[derive(Debug, Clone)]
pub struct VqEncoder {
    encoder: Encoder,
    quant_conv: Conv2d,
    cfg: VqConfig,
}

impl VqEncoder {
    /// Builds the encoder half from `vb` (names `encoder.*`, `quant_conv.*`).
    pub fn new(vb: VarBuilder, cfg: &VqConfig) -> Result<Self> {
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            quant_conv: conv(cfg.z_channels, cfg.embed_dim, 1, 1, 0, vb.pp("quant_conv"))?,
            cfg: cfg.clone(),
        })
    }

    /// The architecture this model was built with.
    pub fn config(&self) -> &VqConfig {
        &self.cfg
    }

    /// Images `[B, in_channels, H, W]` in [-1, 1] → unquantised latent
    /// `[B, embed_dim, H/f, W/f]` (no scale factor).
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = x.dims4()?;
        if c != self.cfg.in_channels {
            candle_core::bail!(
                "encoder expects {} image channels, got {c}",
                self.cfg.in_channels
            );
        }
        self.quant_conv.forward(&self.encoder.forward(x)?)
    }

    /// Same as [`VqEncoder::encode`].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.encode(x)
    }

    /// Loads a released encoder file (`encoder.*`, `quant_conv.*`), a whole first-stage
    /// state dict, or a full LDM checkpoint (`first_stage_model.` prefix), in F32.
    pub fn load(path: impl AsRef<Path>, cfg: &VqConfig, device: &Device) -> anyhow::Result<Self> {
        let state = first_stage_part(
            load_state_dict(path)?,
            &["decoder", "post_quant_conv", "quantize"],
        );
        build_checked(&state, DType::F32, device, |vb| Self::new(vb, cfg))
    }
}

/// Decoder half of the first stage: quantise (optional) → `post_quant_conv` → decoder.
#[derive(Debug, Clone)]
pub struct VqDecoder {
    quantize: VectorQuantizer,
    post_quant_conv: Conv2d,
    decoder: Decoder,
    cfg: VqConfig,
}

impl VqDecoder {
    /// Builds the decoder half from `vb` (names `quantize.*`, `post_quant_conv.*`,
    /// `decoder.*`).
    pub fn new(vb: VarBuilder, cfg: &VqConfig) -> Result<Self> {
        Ok(Self {
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quantize: VectorQuantizer::new(vb.pp("quantize"), cfg)?,
            post_quant_conv: conv(
                cfg.embed_dim,
                cfg.z_channels,
                1,
                1,
                0,
                vb.pp("post_quant_conv"),
            )?,
            cfg: cfg.clone(),
        })
    }

    /// The architecture this model was built with.
    pub fn config(&self) -> &VqConfig {
        &self.cfg
    }

    /// The codebook quantiser.
    pub fn quantizer(&self) -> &VectorQuantizer {
        &self.quantize
    }

    /// Latent `[B, embed_dim, h, w]` → image `[B, out_ch, h*f, w*f]` in about [-1, 1]
    /// (unclamped). With `quantize`, each latent vector is first snapped to its nearest
    /// codebook entry, as in the reference's decode.
    pub fn decode(&self, latent: &Tensor, quantize: bool) -> Result<Tensor> {
        let (_, c, _, _) = latent.dims4()?;
        if c != self.cfg.embed_dim {
            candle_core::bail!(
                "decoder expects {} latent channels, got {c}",
                self.cfg.embed_dim
            );
        }
        let z = if quantize {
            self.quantize.forward(latent)?.0
        } else {
            latent.clone()
        };
        self.decoder.forward(&self.post_quant_conv.forward(&z)?)
    }

    /// [`VqDecoder::decode`] followed by `(clamp(x, -1, 1) + 1) / 2`, i.e. pixels in [0, 1].
    pub fn decode_to_unit(&self, latent: &Tensor, quantize: bool) -> Result<Tensor> {
        to_unit_range(&self.decode(latent, quantize)?)
    }

    /// Decodes code indices `[B, h*w]` (as from [`VectorQuantizer::indices`]) to images.
    pub fn decode_indices(&self, indices: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let z = self.quantize.lookup(indices, h, w)?;
        self.decoder.forward(&self.post_quant_conv.forward(&z)?)
    }

    /// Loads a released decoder file (`decoder.*`, `post_quant_conv.*`,
    /// `quantize.embedding.weight`), a whole first-stage state dict, or a full LDM
    /// checkpoint (`first_stage_model.` prefix), in F32.
    pub fn load(path: impl AsRef<Path>, cfg: &VqConfig, device: &Device) -> anyhow::Result<Self> {
        let state = first_stage_part(load_state_dict(path)?, &["encoder", "quant_conv"]);
        build_checked(&state, DType::F32, device, |vb| Self::new(vb, cfg))
    }
}

/// Maps decoder output in [-1, 1] to [0, 1]: `(clamp(x, -1, 1) + 1) / 2`.
pub fn to_unit_range(x: &Tensor) -> Result<Tensor> {
    (x.clamp(-1f32, 1f32)? + 1.0)? / 2.0
}

/// Reduces a checkpoint to the first-stage names of one half. If any key carries the LDM
/// `first_stage_model.` prefix, only such keys are kept (prefix removed); then keys of the
/// other half (`other` top-level names) and of the training loss (`loss.*`) are dropped.
/// Anything else stays, so that unexpected keys are still reported.
fn first_stage_part(mut state: StateDict, other: &[&str]) -> StateDict {
    if state.tensors.keys().any(|k| k.starts_with(LDM_PREFIX)) {
        state.tensors.retain(|k, _| k.starts_with(LDM_PREFIX));
        state = state.strip_prefix(LDM_PREFIX);
    }
    state.tensors.retain(|k, _| {
        let top = k.split('.').next().unwrap_or_default();
        top != "loss" && !other.contains(&top)
    });
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::parameter_specs;
    use crate::testutil::{fixture, fixtures_dir};
    use std::collections::HashMap;

    use crate::testutil::max_abs_diff as max_abs;

    struct Fixtures {
        cfg: VqConfig,
        io: HashMap<String, Tensor>,
        encoder: std::path::PathBuf,
        decoder: std::path::PathBuf,
    }

    fn fixtures() -> Option<Fixtures> {
        let cfg = fixture("vq_tiny_config.json")?;
        let io = fixture("vq_tiny_io.safetensors")?;
        let encoder = fixture("vq_tiny_first_stage_encoder_state_dict.pt")?;
        let decoder = fixture("vq_tiny_first_stage_decoder_state_dict.pt")?;
        Some(Fixtures {
            cfg: VqConfig::from_json_file(cfg).unwrap(),
            io: candle_core::safetensors::load(io, &Device::Cpu).unwrap(),
            encoder,
            decoder,
        })
    }

    #[test]
    fn fixture_config_parses_and_ignores_unknown_keys() {
        let Some(f) = fixtures() else { return };
        assert_eq!(f.cfg.ch, 32);
        assert_eq!(f.cfg.ch_mult, vec![1, 2, 4]);
        assert_eq!(f.cfg.n_embed, 256);
        assert_eq!(f.cfg.resolution, 64);
        assert!(f.cfg.attn_resolutions.is_empty());
    }

    #[test]
    fn encoder_matches_reference_latent() {
        let Some(f) = fixtures() else { return };
        let enc = VqEncoder::load(&f.encoder, &f.cfg, &Device::Cpu).unwrap();
        let latent = enc.encode(&f.io["image"]).unwrap();
        let err = max_abs(&latent, &f.io["latent"]);
        eprintln!("latent max abs err {err:e}");
        assert!(err <= 1e-4, "latent max abs err {err}");
    }

    #[test]
    fn quantizer_matches_reference_indices_exactly() {
        let Some(f) = fixtures() else { return };
        let dec = VqDecoder::load(&f.decoder, &f.cfg, &Device::Cpu).unwrap();
        let idx = dec.quantizer().indices(&f.io["latent"]).unwrap();
        let got = idx.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
        let want = f.io["code_indices"].to_vec2::<i64>().unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn decoder_matches_reference_outputs() {
        let Some(f) = fixtures() else { return };
        let dec = VqDecoder::load(&f.decoder, &f.cfg, &Device::Cpu).unwrap();
        let latent = &f.io["latent"];
        let q = dec.decode(latent, true).unwrap();
        let nq = dec.decode(latent, false).unwrap();
        let unit = dec.decode_to_unit(latent, true).unwrap();
        let (e_q, e_nq, e_u) = (
            max_abs(&q, &f.io["decoded_quantized"]),
            max_abs(&nq, &f.io["decoded_not_quantized"]),
            max_abs(&unit, &f.io["decoded_quantized_01"]),
        );
        eprintln!("decoded max abs err: quantized {e_q:e}, not quantized {e_nq:e}, 01 {e_u:e}");
        assert!(
            e_q <= 1e-4 && e_nq <= 1e-4 && e_u <= 1e-4,
            "{e_q} {e_nq} {e_u}"
        );
        let codes = f.io["code_indices"].clone();
        let from_codes = dec.decode_indices(&codes, 16, 16).unwrap();
        assert!(max_abs(&from_codes, &f.io["decoded_quantized"]) <= 1e-4);
    }

    fn parse_key_line(line: &str) -> Option<(String, Vec<usize>)> {
        let (name, shape) = line.trim().split_once(' ')?;
        let dims = shape
            .trim()
            .trim_start_matches('(')
            .trim_end_matches(')')
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim().parse().ok())
            .collect::<Option<Vec<usize>>>()?;
        Some((name.to_owned(), dims))
    }

    #[test]
    fn released_decoder_names_and_shapes_match_reference() {
        let Some(dir) = fixtures_dir() else {
            eprintln!("skipping: fixtures dir not found");
            return;
        };
        let path = dir.join("../reference/ae_decoder_keys.txt");
        let Ok(text) = std::fs::read_to_string(&path) else {
            if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
                panic!("{} is missing; CI=true forbids skipping", path.display());
            }
            eprintln!("skipping: {} not found", path.display());
            return;
        };
        let mut want: Vec<(String, Vec<usize>)> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| parse_key_line(l).unwrap_or_else(|| panic!("bad line {l:?}")))
            .collect();
        assert_eq!(want.len(), 115);
        let cfg = VqConfig::released();
        let mut got: Vec<(String, Vec<usize>)> = parameter_specs(|vb| VqDecoder::new(vb, &cfg))
            .unwrap()
            .into_iter()
            .map(|s| (s.name, s.shape))
            .collect();
        want.sort();
        got.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn released_encoder_has_expected_layout() {
        let cfg = VqConfig::released();
        let specs = parameter_specs(|vb| VqEncoder::new(vb, &cfg)).unwrap();
        let find = |n: &str| specs.iter().find(|s| s.name == n).map(|s| s.shape.clone());
        assert_eq!(find("encoder.conv_in.weight"), Some(vec![128, 3, 3, 3]));
        assert_eq!(
            find("encoder.down.1.downsample.conv.weight"),
            Some(vec![256, 256, 3, 3])
        );
        assert_eq!(
            find("encoder.down.2.block.0.nin_shortcut.weight"),
            Some(vec![512, 256, 1, 1])
        );
        assert_eq!(find("encoder.down.2.downsample.conv.weight"), None);
        assert_eq!(find("encoder.conv_out.weight"), Some(vec![3, 512, 3, 3]));
        assert_eq!(find("quant_conv.weight"), Some(vec![3, 3, 1, 1]));
    }

    #[test]
    fn mismatched_config_names_key_and_both_shapes() {
        let Some(f) = fixtures() else { return };
        let cfg = VqConfig {
            ch: 64,
            ..f.cfg.clone()
        };
        let err = VqDecoder::load(&f.decoder, &cfg, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(!err.contains('\n'), "{err}");
        assert!(
            err.contains(
                "`decoder.conv_in.weight` checkpoint [128, 3, 3, 3] vs config [256, 3, 3, 3]"
            ),
            "{err}"
        );
    }

    #[test]
    fn loads_ldm_prefixed_checkpoint() {
        let Some(f) = fixtures() else { return };
        let mut all = HashMap::new();
        for p in [&f.encoder, &f.decoder] {
            for (k, v) in load_state_dict(p).unwrap().tensors {
                all.insert(format!("first_stage_model.{k}"), v);
            }
        }
        all.insert(
            "model.diffusion_model.out.weight".to_owned(),
            Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
        );
        all.insert(
            "first_stage_model.loss.logvar".to_owned(),
            Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ldm.safetensors");
        candle_core::safetensors::save(&all, &path).unwrap();
        let enc = VqEncoder::load(&path, &f.cfg, &Device::Cpu).unwrap();
        let dec = VqDecoder::load(&path, &f.cfg, &Device::Cpu).unwrap();
        let latent = enc.encode(&f.io["image"]).unwrap();
        assert!(max_abs(&latent, &f.io["latent"]) <= 1e-4);
        let out = dec.decode(&f.io["latent"], false).unwrap();
        assert!(max_abs(&out, &f.io["decoded_not_quantized"]) <= 1e-4);
    }

    #[test]
    fn wrong_half_reports_missing_keys() {
        let Some(f) = fixtures() else { return };
        let err = VqEncoder::load(&f.decoder, &f.cfg, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing") && err.contains("encoder.conv_in.weight"),
            "{err}"
        );
    }

    #[test]
    fn bad_configs_and_inputs_are_errors() {
        let cfg = VqConfig {
            ch_mult: vec![],
            ..VqConfig::released()
        };
        assert!(parameter_specs(|vb| VqDecoder::new(vb, &cfg)).is_err());
        let cfg = VqConfig {
            ch: 20,
            ..VqConfig::released()
        };
        assert!(parameter_specs(|vb| VqEncoder::new(vb, &cfg)).is_err());
        let cfg = VqConfig {
            double_z: true,
            ..VqConfig::released()
        };
        assert!(parameter_specs(|vb| VqEncoder::new(vb, &cfg)).is_err());

        let cfg = VqConfig {
            ch: 32,
            n_embed: 4,
            ..VqConfig::released()
        };
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let dec = VqDecoder::new(vb.clone(), &cfg).unwrap();
        let bad = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(dec.decode(&bad, true).is_err());
        let idx = Tensor::new(&[[0u32, 1, 2, 9]], &Device::Cpu).unwrap();
        assert!(dec.decode_indices(&idx, 2, 2).is_err());
        assert!(dec.decode_indices(&idx, 3, 3).is_err());
        let enc = VqEncoder::new(vb, &cfg).unwrap();
        assert!(enc.encode(&bad).is_err());
        let rank3 = Tensor::zeros((3, 8, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(enc.encode(&rank3).is_err());
    }

    #[test]
    fn quantizer_picks_nearest_and_first_on_ties() {
        let cfg = VqConfig {
            n_embed: 3,
            embed_dim: 2,
            ..VqConfig::released()
        };
        let mut map = HashMap::new();
        map.insert(
            "embedding.weight".to_owned(),
            Tensor::new(&[[0f32, 0.], [1., 1.], [1., 1.]], &Device::Cpu).unwrap(),
        );
        let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
        let q = VectorQuantizer::new(vb, &cfg).unwrap();
        // z: [1, 2, 1, 3] → positions (0.1,0.2), (0.9,0.8), (2,2).
        let z = Tensor::new(&[[[[0.1f32, 0.9, 2.0]], [[0.2, 0.8, 2.0]]]], &Device::Cpu).unwrap();
        let (zq, idx) = q.forward(&z).unwrap();
        assert_eq!(idx.to_vec2::<u32>().unwrap(), vec![vec![0, 1, 1]]);
        assert_eq!(zq.dims(), &[1, 2, 1, 3]);
        assert_eq!(
            zq.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0., 1., 1., 0., 1., 1.]
        );
    }
}
