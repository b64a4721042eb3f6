//! ONNX face-recognition models ([`OnnxFrModel`]) and their input descriptor.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::runtime::OnnxNet;
use crate::imageops::resize_bilinear;

/// Order of the colour planes the model expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    /// Red, green, blue.
    Rgb,
    /// Blue, green, red (OpenCV-style models).
    Bgr,
}

/// How a face-recognition model wants its input: `(pixel − mean) / std` per channel, in
/// the model's channel order, planar, `input_size = [height, width]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrDescriptor {
    /// `[height, width]` of the input.
    pub input_size: [usize; 2],
    /// Channel order of the input planes.
    pub channel_order: ChannelOrder,
    /// Per-channel mean (in the model's channel order), on the 0–255 scale.
    pub mean: [f32; 3],
    /// Per-channel standard deviation (in the model's channel order), on the 0–255 scale.
    pub std: [f32; 3],
}

impl Default for FrDescriptor {
    fn default() -> Self {
        Self::insightface()
    }
}

/// The descriptor file: an optional preset plus optional overrides of its fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DescriptorFile {
    preset: Option<String>,
    input_size: Option<[usize; 2]>,
    channel_order: Option<ChannelOrder>,
    mean: Option<[f32; 3]>,
    std: Option<[f32; 3]>,
}

impl FrDescriptor {
    /// InsightFace model zoo (`w600k_r50.onnx`, `glintr100.onnx`, arcface_torch exports):
    /// 112 × 112 RGB, `(x − 127.5) / 127.5`.
    pub fn insightface() -> Self {
        Self {
            input_size: [112, 112],
            channel_order: ChannelOrder::Rgb,
            mean: [127.5; 3],
            std: [127.5; 3],
        }
    }

    /// MobileFaceNet-style models (e.g. `fr_feature.onnx`): 112 × 112 RGB, `(x − 127) / 128`.
    pub fn mobilefacenet() -> Self {
        Self {
            input_size: [112, 112],
            channel_order: ChannelOrder::Rgb,
            mean: [127.0; 3],
            std: [128.0; 3],
        }
    }

    /// A preset by name: `insightface` or `mobilefacenet`.
    ///
    /// # Errors
    /// On another name.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "insightface" => Ok(Self::insightface()),
            "mobilefacenet" => Ok(Self::mobilefacenet()),
            _ => bail!("unknown preset `{name}` (insightface or mobilefacenet)"),
        }
    }

    /// The descriptor file of a model: `<model>.json` (the model path with its extension
    /// replaced, e.g. `w600k_r50.json`) or `<model>.onnx.json`, whichever exists.
    pub fn path_for(model: &Path) -> Option<PathBuf> {
        let mut appended = model.as_os_str().to_owned();
        appended.push(".json");
        [model.with_extension("json"), PathBuf::from(appended)]
            .into_iter()
            .find(|p| p.is_file())
    }

    /// Reads a descriptor file: `{"preset": "mobilefacenet"}` and/or any of `input_size`
    /// (`[h, w]`), `channel_order` (`"rgb"`/`"bgr"`), `mean`, `std` (3 values each, 0–255
    /// scale); fields not given come from the preset (default `insightface`).
    ///
    /// # Errors
    /// One line naming the file and the bad key.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let f: DescriptorFile = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: bad model descriptor ({e})", path.display()))?;
        let mut d = match &f.preset {
            Some(name) => Self::preset(name).map_err(|e| anyhow!("{}: {e}", path.display()))?,
            None => Self::insightface(),
        };
        if let Some(s) = f.input_size {
            d.input_size = s;
        }
        if let Some(c) = f.channel_order {
            d.channel_order = c;
        }
        if let Some(m) = f.mean {
            d.mean = m;
        }
        if let Some(s) = f.std {
            d.std = s;
        }
        if d.input_size.contains(&0) {
            bail!("{}: input_size must be positive", path.display());
        }
        if d.std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            bail!("{}: std must be finite and non-zero", path.display());
        }
        Ok(d)
    }

    /// Planar `3 × H × W` network input from an RGB image; resized (bilinear, like
    /// `cv2.resize`/torch `align_corners=False`) when its size differs from `input_size`.
    ///
    /// # Errors
    /// When the image is empty.
    pub fn preprocess(&self, img: &RgbImage) -> Result<Vec<f32>> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let [oh, ow] = self.input_size;
        let mut planar = vec![0.0f32; 3 * h * w];
        let order = match self.channel_order {
            ChannelOrder::Rgb => [0, 1, 2],
            ChannelOrder::Bgr => [2, 1, 0],
        };
        for (p, px) in img.pixels().enumerate() {
            for (plane, &src) in order.iter().enumerate() {
                planar[plane * h * w + p] = f32::from(px[src]);
            }
        }
        let mut planar = if (h, w) == (oh, ow) {
            planar
        } else {
            resize_bilinear(&planar, 3, (h, w), (oh, ow))?
        };
        for (plane, values) in planar.chunks_exact_mut(oh * ow).enumerate() {
            let (m, s) = (self.mean[plane], self.std[plane]);
            for v in values {
                *v = (*v - m) / s;
            }
        }
        Ok(planar)
    }
}

/// An ONNX face-recognition model: one `N × 3 × H × W` input, one `N × D` output;
/// embeddings are L2-normalised.
#[derive(Debug, Clone)]
pub struct OnnxFrModel {
    net: OnnxNet,
    descriptor: FrDescriptor,
    dim: usize,
    sha256: String,
}

impl OnnxFrModel {
    /// Loads a model with the descriptor beside it ([`FrDescriptor::path_for`]), else the
    /// InsightFace defaults (input size taken from the model when it declares one).
    ///
    /// # Errors
    /// One line naming the file (see [`OnnxFrModel::load_with`]).
    pub fn load(path: &Path) -> Result<Self> {
        match FrDescriptor::path_for(path) {
            Some(d) => Self::load_with(path, FrDescriptor::load(&d)?),
            None => {
                let mut d = FrDescriptor::insightface();
                // Respect a fixed input size declared by the model itself.
                let probe = OnnxNet::load(path, 3, None);
                if let Ok(net) = &probe {
                    let [_, _, h, w] = net.input_shape();
                    d.input_size = [h, w];
                    return Self::from_net(net.clone(), d);
                }
                Self::load_with(path, d)
            }
        }
    }

    /// Loads a model with an explicit descriptor.
    ///
    /// # Errors
    /// One line naming the file: unreadable or corrupted ONNX, an input other than
    /// `[N, 3, H, W]` or of another size than the descriptor's, an output other than `[1, D]`.
    pub fn load_with(path: &Path, descriptor: FrDescriptor) -> Result<Self> {
        let [h, w] = descriptor.input_size;
        let net = OnnxNet::load(path, 3, Some((h, w)))?;
        Self::from_net(net, descriptor)
    }

    fn from_net(net: OnnxNet, descriptor: FrDescriptor) -> Result<Self> {
        let p = net.path().display().to_string();
        let outs = net.output_shapes();
        if outs.len() != 1 {
            bail!(
                "{p}: the model has {} outputs, expected one embedding output",
                outs.len()
            );
        }
        let dim = match outs[0].as_slice() {
            [1, d] if *d > 0 => *d,
            [d] if *d > 0 => *d,
            s => bail!("{p}: output has shape {s:?}, expected [1, D] embeddings"),
        };
        let sha256 = crate::files::sha256_file(net.path())?;
        Ok(Self {
            net,
            descriptor,
            dim,
            sha256,
        })
    }

    /// The model's descriptor.
    pub fn descriptor(&self) -> &FrDescriptor {
        &self.descriptor
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// SHA-256 (hex) of the model file.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        self.net.path()
    }

    /// Raw (not normalised) output for one preprocessed planar input.
    ///
    /// # Errors
    /// On a wrong input length or a failing run.
    pub fn forward_raw(&self, input: &[f32]) -> Result<Vec<f32>> {
        let mut out = self.net.run(input)?;
        Ok(out.swap_remove(0).data)
    }

    /// L2-normalised embedding of an RGB image (resized to the input size if needed;
    /// give an aligned face crop for real faces).
    ///
    /// # Errors
    /// On a failing run or a zero embedding.
    pub fn embed(&self, img: &RgbImage) -> Result<Vec<f32>> {
        let raw = self.forward_raw(&self.descriptor.preprocess(img)?)?;
        l2_normalised(raw).ok_or_else(|| {
            anyhow!(
                "{}: the model returned a zero or non-finite embedding",
                self.path().display()
            )
        })
    }
}

/// `v / ‖v‖` (computed in f64), `None` when the norm is zero or not finite.
pub fn l2_normalised(v: Vec<f32>) -> Option<Vec<f32>> {
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    (norm > 0.0 && norm.is_finite())
        .then(|| v.iter().map(|x| (f64::from(*x) / norm) as f32).collect())
}

/// Cosine similarity of two L2-normalised embeddings (their dot product).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
