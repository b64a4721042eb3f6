//! The shipped default model (`assets/default/`): FR backbone, VQ autoencoder and U-Net, with
//! their configs, embedded into the binary with `include_bytes!` when the files were present
//! at build time (see `build.rs`), or read from a folder.

use crate::checkpoint::{build_checked, StateDict};
use crate::diffusion::schedule::Schedule;
use crate::models::config::ConfigSource;
use crate::models::iresnet::{IResNet, IResNetConfig};
use crate::models::unet::{ConditionalUNet, UNetConfig};
use crate::models::vq::{VqConfig, VqDecoder};
use crate::pipeline::{Pipeline, WeightPaths};
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// File names of the six default-model files, in `assets/default/`.
pub const FILE_NAMES: [&str; 6] = [
    "fr.safetensors",
    "fr.json",
    "vq.safetensors",
    "vq.json",
    "unet.safetensors",
    "unet.json",
];

#[cfg(idiff_default_model)]
mod embedded {
    pub const FR: &[u8] = include_bytes!("../../assets/default/fr.safetensors");
    pub const FR_JSON: &[u8] = include_bytes!("../../assets/default/fr.json");
    pub const VQ: &[u8] = include_bytes!("../../assets/default/vq.safetensors");
    pub const VQ_JSON: &[u8] = include_bytes!("../../assets/default/vq.json");
    pub const UNET: &[u8] = include_bytes!("../../assets/default/unet.safetensors");
    pub const UNET_JSON: &[u8] = include_bytes!("../../assets/default/unet.json");
}

/// Whether this build carries the default model.
pub fn is_embedded() -> bool {
    cfg!(idiff_default_model)
}

/// The default model's files (weights as safetensors bytes, configs as JSON).
#[derive(Debug, Clone)]
pub struct DefaultModel {
    /// FR backbone weights (IResNet key names).
    pub fr: Cow<'static, [u8]>,
    /// FR architecture.
    pub fr_config: IResNetConfig,
    /// VQ autoencoder weights (`encoder.*`, `quant_conv.*`, `quantize.*`, `post_quant_conv.*`,
    /// `decoder.*`).
    pub vq: Cow<'static, [u8]>,
    /// VQ architecture.
    pub vq_config: VqConfig,
    /// U-Net weights (EMA).
    pub unet: Cow<'static, [u8]>,
    /// U-Net architecture.
    pub unet_config: UNetConfig,
    /// Where the files came from (for messages).
    pub origin: String,
}

impl DefaultModel {
    /// The model embedded in this binary; a one-line error when the build had no assets.
    pub fn embedded() -> Result<Self> {
        #[cfg(idiff_default_model)]
        {
            Self::from_parts(
                [
                    embedded::FR,
                    embedded::FR_JSON,
                    embedded::VQ,
                    embedded::VQ_JSON,
                    embedded::UNET,
                    embedded::UNET_JSON,
                ]
                .map(Cow::Borrowed),
                "the built-in default model".to_owned(),
            )
        }
        #[cfg(not(idiff_default_model))]
        {
            anyhow::bail!(
                "this build has no built-in default model (assets/default/ was incomplete at \
                 build time); give --unet and --decoder"
            )
        }
    }

    /// Reads the six files from a folder (e.g. a training run before it is shipped).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<Cow<'static, [u8]>> {
            let p = dir.join(name);
            Ok(Cow::Owned(
                std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?,
            ))
        };
        let parts = [
            read(FILE_NAMES[0])?,
            read(FILE_NAMES[1])?,
            read(FILE_NAMES[2])?,
            read(FILE_NAMES[3])?,
            read(FILE_NAMES[4])?,
            read(FILE_NAMES[5])?,
        ];
        Self::from_parts(parts, dir.display().to_string())
    }

    fn from_parts(parts: [Cow<'static, [u8]>; 6], origin: String) -> Result<Self> {
        let [fr, fr_json, vq, vq_json, unet, unet_json] = parts;
        let json = |bytes: &[u8], what: &str| -> Result<serde_json::Value> {
            serde_json::from_slice(bytes)
                .map_err(|e| anyhow::anyhow!("{origin}: invalid {what}: {e}"))
        };
        let fr_config: IResNetConfig = serde_json::from_value(json(&fr_json, "fr.json")?)
            .map_err(|e| anyhow::anyhow!("{origin}: invalid fr.json: {e}"))?;
        let vq_config: VqConfig = serde_json::from_value(json(&vq_json, "vq.json")?)
            .map_err(|e| anyhow::anyhow!("{origin}: invalid vq.json: {e}"))?;
        let unet_config: UNetConfig = serde_json::from_value(json(&unet_json, "unet.json")?)
            .map_err(|e| anyhow::anyhow!("{origin}: invalid unet.json: {e}"))?;
        unet_config.validate()?;
        Ok(Self {
            fr,
            fr_config,
            vq,
            vq_config,
            unet,
            unet_config,
            origin,
        })
    }

    fn state(&self, bytes: &[u8], name: &str) -> Result<StateDict> {
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: {name}: {e}", self.origin))?;
        Ok(StateDict {
            tensors,
            path: PathBuf::from(format!("{} ({name})", self.origin)),
        })
    }

    /// The U-Net, in `dtype` on `device`.
    pub fn unet_model(&self, dtype: DType, device: &Device) -> Result<ConditionalUNet> {
        let state = self.state(&self.unet, "unet.safetensors")?;
        build_checked(&state, dtype, device, |vb| {
            ConditionalUNet::new(vb, &self.unet_config)
        })
    }

    /// The VQ decoder (with its codebook), in F32.
    pub fn vq_decoder(&self, device: &Device) -> Result<VqDecoder> {
        let mut state = self.state(&self.vq, "vq.safetensors")?;
        state
            .tensors
            .retain(|k, _| !(k.starts_with("encoder.") || k.starts_with("quant_conv.")));
        build_checked(&state, DType::F32, device, |vb| {
            VqDecoder::new(vb, &self.vq_config)
        })
    }

    /// The FR backbone, in F32 (embeddings are `normalise(fr.forward(x))` on `fr_config.input_size` square input).
    pub fn fr_model(&self, device: &Device) -> Result<IResNet> {
        let mut state = self
            .state(&self.fr, "fr.safetensors")?
            .strip_prefix("module.");
        state
            .tensors
            .retain(|k, _| !k.ends_with(".num_batches_tracked"));
        build_checked(&state, DType::F32, device, |vb| {
            IResNet::new(vb, &self.fr_config)
        })
    }

    /// A sampling pipeline (U-Net in `dtype`, decoder in F32) on `device`.
    pub fn pipeline(&self, dtype: DType, device: &Device) -> Result<Pipeline> {
        Ok(Pipeline {
            unet: self.unet_model(dtype, device)?,
            decoder: self.vq_decoder(device)?,
            schedule: Schedule::reference(),
            device: device.clone(),
            unet_config_source: ConfigSource::File(PathBuf::from(format!(
                "{} (unet.json)",
                self.origin
            ))),
        })
    }

    /// Writes the six files into `dir` (created if needed; files already there with the same
    /// bytes are kept) and returns path-based [`WeightPaths`] for APIs that need files.
    pub fn write_to(&self, dir: &Path) -> Result<WeightPaths> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let fr_json = serde_json::to_value(&self.fr_config)?;
        let files: [(&str, Vec<u8>); 6] = [
            ("fr.safetensors", self.fr.to_vec()),
            ("fr.json", serde_json::to_vec_pretty(&fr_json)?),
            ("vq.safetensors", self.vq.to_vec()),
            (
                "vq.json",
                serde_json::to_vec_pretty(&super::autoencoder::vq_config_json(&self.vq_config))?,
            ),
            ("unet.safetensors", self.unet.to_vec()),
            ("unet.json", serde_json::to_vec_pretty(&self.unet_config)?),
        ];
        for (name, bytes) in files {
            let p = dir.join(name);
            if std::fs::read(&p).ok().as_deref() == Some(bytes.as_slice()) {
                continue;
            }
            crate::files::write_atomic(&p, &bytes)?;
        }
        Ok(WeightPaths {
            unet: dir.join("unet.safetensors"),
            unet_config: Some(dir.join("unet.json")),
            decoder: dir.join("vq.safetensors"),
            decoder_config: Some(dir.join("vq.json")),
        })
    }

    /// Short content hash (first 12 hex digits of SHA-256 over the U-Net and VQ weights).
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(&self.unet[..]);
        h.update(&self.vq[..]);
        h.update(&self.fr[..]);
        format!("{:x}", h.finalize())[..12].to_owned()
    }
}

/// The cache folder the built-in model is written to for path-based APIs:
/// `$IDIFF_STUDIO_CACHE`, else `$XDG_CACHE_HOME/idiff-studio`, else `~/.cache/idiff-studio`,
/// else the system temporary folder.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("IDIFF_STUDIO_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("idiff-studio");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".cache").join("idiff-studio");
    }
    std::env::temp_dir().join("idiff-studio")
}

/// Writes the built-in default model to `cache_dir()/default-<fingerprint>/` and returns its
/// [`WeightPaths`] (U-Net, decoder and their configs).
pub fn default_weight_paths() -> Result<WeightPaths> {
    let model = DefaultModel::embedded()?;
    let dir = cache_dir().join(format!("default-{}", model.fingerprint()));
    model.write_to(&dir)
}

/// Writes the built-in default model like [`default_weight_paths`] and returns the paths of
/// its FR backbone and config (`fr.safetensors`, `fr.json`), for commands whose FR model
/// argument was left out.
pub fn default_fr_paths() -> Result<(PathBuf, PathBuf)> {
    let model = DefaultModel::embedded()?;
    let dir = cache_dir().join(format!("default-{}", model.fingerprint()));
    model.write_to(&dir)?;
    Ok((dir.join("fr.safetensors"), dir.join("fr.json")))
}
