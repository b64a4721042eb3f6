//! Checkpoint loading: PyTorch zip pickles (`.ckpt`, `.pt`, `.pth`) and safetensors, plus
//! checked model construction that reports missing, unexpected and mis-shaped weights by name.

use anyhow::{bail, Context, Result};
use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The named tensors of one checkpoint file, on the CPU in their stored dtype.
#[derive(Debug, Clone)]
pub struct StateDict {
    /// Tensors by parameter name.
    pub tensors: HashMap<String, Tensor>,
    /// The file they were read from (for error messages).
    pub path: PathBuf,
}

/// What kind of file the first bytes announce.
#[derive(Debug, PartialEq, Eq)]
enum FileKind {
    TorchZip,
    Safetensors,
    LegacyPickle,
    Png,
    Jpeg,
    Unknown,
}

fn sniff(head: &[u8]) -> FileKind {
    if head.starts_with(b"PK\x03\x04") {
        FileKind::TorchZip
    } else if head.starts_with(b"\x89PNG") {
        FileKind::Png
    } else if head.starts_with(&[0xff, 0xd8, 0xff]) {
        FileKind::Jpeg
    } else if head.len() >= 9 && head[8] == b'{' {
        FileKind::Safetensors
    } else if head.first() == Some(&0x80) {
        FileKind::LegacyPickle
    } else {
        FileKind::Unknown
    }
}

/// Loads every tensor of a checkpoint, deciding the format from the file's bytes.
pub fn load_state_dict(path: impl AsRef<Path>) -> Result<StateDict> {
    let path = path.as_ref();
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut head = [0u8; 16];
    let n = read_up_to(&mut file, &mut head)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let tensors = match sniff(&head[..n]) {
        FileKind::TorchZip => read_torch_zip(path)?,
        FileKind::Safetensors => candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: invalid safetensors file: {e}", path.display()))?,
        FileKind::Png => bail!("{}: is a PNG image, not a checkpoint", path.display()),
        FileKind::Jpeg => bail!("{}: is a JPEG image, not a checkpoint", path.display()),
        FileKind::LegacyPickle => bail!(
            "{}: legacy (pre-1.6, non-zip) torch format is not supported; re-save it with torch.save",
            path.display()
        ),
        FileKind::Unknown => bail!(
            "{}: not a checkpoint (expected a torch zip archive or safetensors)",
            path.display()
        ),
    };
    if tensors.is_empty() {
        bail!("{}: checkpoint holds no tensors", path.display());
    }
    Ok(StateDict {
        tensors,
        path: path.to_path_buf(),
    })
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..])? {
            0 => break,
            k => filled += k,
        }
    }
    Ok(filled)
}

/// Reads a `torch.save` zip archive. The archive offset is fixed at 0: the zip crate's
/// offset detection misreads some valid torch files.
fn read_torch_zip(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bad = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "{}: invalid or truncated torch archive: {e}",
            path.display()
        )
    };
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let config = zip::read::Config {
        archive_offset: zip::read::ArchiveOffset::Known(0),
    };
    let mut zip =
        zip::ZipArchive::with_config(config, BufReader::new(file)).map_err(|e| bad(&e))?;
    let pkl_name = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl"))
        .map(|n| n.into_owned())
        .ok_or_else(|| anyhow::anyhow!("{}: torch archive has no data.pkl", path.display()))?;
    let dir = pkl_name.trim_end_matches(".pkl").to_owned();
    let object = {
        let entry = zip.by_name(&pkl_name).map_err(|e| bad(&e))?;
        let mut reader = BufReader::new(entry);
        let mut stack = Stack::empty();
        stack.read_loop(&mut reader).map_err(|e| bad(&e))?;
        stack.finalize().map_err(|e| bad(&e))?
    };
    let entries = state_dict_entries(object)
        .ok_or_else(|| anyhow::anyhow!("{}: the pickle is not a state dict", path.display()))?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut tensors = HashMap::new();
    for (name, value) in entries {
        let key = match &name {
            Object::Unicode(s) => s.clone(),
            _ => continue,
        };
        let info = match value.into_tensor_info(name, Path::new(&dir)) {
            Ok(Some(info)) => info,
            _ => continue,
        };
        if !storages.contains_key(&info.path) {
            let mut entry = zip.by_name(&info.path).map_err(|e| bad(&e))?;
            let mut bytes = Vec::with_capacity(entry.size() as usize);
            entry
                .read_to_end(&mut bytes)
                .map_err(|e| bad(&format!("storage {}: {e}", info.path)))?;
            storages.insert(info.path.clone(), bytes);
        }
        let storage = &storages[&info.path];
        let tensor = tensor_from_storage(storage, &info)
            .with_context(|| format!("{}: tensor `{key}`", path.display()))?;
        tensors.insert(key, tensor);
    }
    Ok(tensors)
}

/// Finds the `(name, value)` entries of the state dict inside an unpickled object: a plain
/// dict, an `OrderedDict`, or a dict with a `state_dict` entry (Lightning checkpoints).
fn state_dict_entries(object: Object) -> Option<Vec<(Object, Object)>> {
    let entries = match object {
        Object::Dict(entries) => entries,
        Object::Build { callable, args } => match (*callable, *args) {
            (_, Object::Dict(entries)) => entries,
            (Object::Reduce { args, .. }, _) => match *args {
                Object::Dict(entries) => entries,
                _ => return None,
            },
            _ => return None,
        },
        Object::Reduce { args, .. } => match *args {
            Object::Dict(entries) => entries,
            _ => return None,
        },
        _ => return None,
    };
    let nested = entries
        .iter()
        .position(|(k, _)| *k == Object::Unicode("state_dict".to_owned()));
    match nested {
        Some(i) => state_dict_entries(entries.into_iter().nth(i)?.1),
        None => Some(entries),
    }
}

/// Materialises one (possibly strided) tensor from its storage bytes.
fn tensor_from_storage(storage: &[u8], info: &candle_core::pickle::TensorInfo) -> Result<Tensor> {
    let elem = info.dtype.size_in_bytes();
    let dims = info.layout.dims().to_vec();
    let strides = info.layout.stride().to_vec();
    let start = info.layout.start_offset();
    let count: usize = dims.iter().product();
    let max_index: usize = dims
        .iter()
        .zip(&strides)
        .map(|(d, s)| d.saturating_sub(1) * s)
        .sum();
    if count > 0 && start + (max_index + 1) * elem > storage.len() {
        bail!(
            "storage holds {} bytes but shape {:?} needs {} (truncated file?)",
            storage.len(),
            dims,
            start + (max_index + 1) * elem
        );
    }
    let bytes = if info.layout.is_contiguous() {
        storage[start..start + count * elem].to_vec()
    } else {
        gather_strided(storage, start, &dims, &strides, elem)
    };
    Ok(Tensor::from_raw_buffer(
        &bytes,
        info.dtype,
        &dims,
        &Device::Cpu,
    )?)
}

fn gather_strided(
    storage: &[u8],
    start: usize,
    dims: &[usize],
    strides: &[usize],
    elem: usize,
) -> Vec<u8> {
    let count: usize = dims.iter().product();
    let mut out = Vec::with_capacity(count * elem);
    let mut index = vec![0usize; dims.len()];
    for _ in 0..count {
        let offset: usize = index.iter().zip(strides).map(|(i, s)| i * s).sum();
        let at = start + offset * elem;
        out.extend_from_slice(&storage[at..at + elem]);
        for d in (0..dims.len()).rev() {
            index[d] += 1;
            if index[d] < dims[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}

impl StateDict {
    /// Removes `prefix` from every key that carries it; keys without it are kept as they are.
    pub fn strip_prefix(mut self, prefix: &str) -> Self {
        self.tensors = self
            .tensors
            .into_iter()
            .map(|(k, v)| match k.strip_prefix(prefix) {
                Some(rest) => (rest.to_owned(), v),
                None => (k, v),
            })
            .collect();
        self
    }

    /// Removes and returns a tensor (for buffers that are not model parameters).
    pub fn take(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }
}

/// A parameter the model asked for: its name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParameterSpec {
    /// Full dotted name.
    pub name: String,
    /// Expected shape.
    pub shape: Vec<usize>,
}

/// A `VarBuilder` backend that serves tensors from a map and records every request, so that
/// all mismatches can be reported together instead of failing at the first one.
struct RecordingBackend {
    tensors: HashMap<String, Tensor>,
    requested: Mutex<Vec<ParameterSpec>>,
}

impl SimpleBackend for RecordingBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.requested
            .lock()
            .expect("recording lock")
            .push(ParameterSpec {
                name: name.to_owned(),
                shape: s.dims().to_vec(),
            });
        match self.tensors.get(name) {
            Some(t) if t.dims() == s.dims() => t.to_dtype(dtype)?.to_device(dev),
            // Placeholder without allocation; the mismatch is reported after construction.
            _ => Tensor::zeros((), dtype, dev)?.broadcast_as(s),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.tensors.get(name) {
            Some(t) => t.to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("cannot find tensor {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Shares one recording backend between the `VarBuilder` and the caller.
struct SharedRecorder(Arc<RecordingBackend>);

impl SimpleBackend for SharedRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

/// Runs a model constructor against `tensors`, returning the model and every parameter it
/// requested.
fn record<M>(
    tensors: HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> candle_core::Result<(M, Vec<ParameterSpec>)> {
    let backend = Arc::new(RecordingBackend {
        tensors,
        requested: Mutex::new(Vec::new()),
    });
    let vb = VarBuilder::from_backend(
        Box::new(SharedRecorder(backend.clone())),
        dtype,
        device.clone(),
    );
    let model = build(vb)?;
    let specs = backend.requested.lock().expect("recording lock").clone();
    Ok((model, specs))
}

/// Lists the parameters (names and shapes) a model constructor requests, without allocating
/// them.
pub fn parameter_specs<M>(
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<Vec<ParameterSpec>> {
    Ok(record(HashMap::new(), DType::F32, &Device::Cpu, build)?.1)
}

/// Builds a model from a state dict, checking that the checkpoint and the configured
/// architecture agree exactly. Missing keys, unexpected keys and shape mismatches are
/// reported together, by name and with both shapes, in one line.
pub fn build_checked<M>(
    state: &StateDict,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<M> {
    let (model, specs) = record(state.tensors.clone(), dtype, device, build)
        .map_err(|e| anyhow::anyhow!("{}: {e}", state.path.display()))?;
    check_against(state, &specs)?;
    Ok(model)
}

/// Compares requested parameter specs with the checkpoint's tensors.
pub fn check_against(state: &StateDict, specs: &[ParameterSpec]) -> Result<()> {
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    let mut wanted = BTreeMap::new();
    for spec in specs {
        wanted.insert(spec.name.as_str(), ());
        match state.tensors.get(&spec.name) {
            None => missing.push(format!("`{}` {:?}", spec.name, spec.shape)),
            Some(t) if t.dims() != spec.shape.as_slice() => mismatched.push(format!(
                "`{}` checkpoint {:?} vs config {:?}",
                spec.name,
                t.dims(),
                spec.shape
            )),
            Some(_) => {}
        }
    }
    let mut unexpected: Vec<String> = state
        .tensors
        .iter()
        .filter(|(k, _)| !wanted.contains_key(k.as_str()))
        .map(|(k, t)| format!("`{k}` {:?}", t.dims()))
        .collect();
    unexpected.sort();
    missing.sort();
    mismatched.sort();
    if missing.is_empty() && mismatched.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
    let mut parts = Vec::new();
    for (label, list) in [
        ("shape mismatch", &mismatched),
        ("missing", &missing),
        ("unexpected", &unexpected),
    ] {
        if !list.is_empty() {
            parts.push(format!("{label} ({}): {}", list.len(), summarise(list)));
        }
    }
    bail!(
        "{}: weights do not match the config: {}",
        state.path.display(),
        parts.join("; ")
    )
}

fn summarise(list: &[String]) -> String {
    const SHOWN: usize = 6;
    let mut s = list
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if list.len() > SHOWN {
        s.push_str(&format!(", … {} more", list.len() - SHOWN));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::fixture;

    #[test]
    fn sniffs_formats() {
        assert_eq!(sniff(b"PK\x03\x04rest"), FileKind::TorchZip);
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n"), FileKind::Png);
        assert_eq!(sniff(b"\x10\0\0\0\0\0\0\0{\"a\""), FileKind::Safetensors);
        assert_eq!(sniff(b"hello"), FileKind::Unknown);
    }

    #[test]
    fn loads_iresnet_fixture_despite_zip_offset_trap() {
        let Some(p) = fixture("iresnet_tiny_backbone.pth") else {
            return;
        };
        let sd = load_state_dict(&p).unwrap();
        assert_eq!(sd.tensors["conv1.weight"].dims(), &[64, 3, 3, 3]);
    }

    #[test]
    fn truncated_checkpoint_is_a_clear_error() {
        let Some(p) = fixture("vq_tiny_first_stage_decoder_state_dict.pt") else {
            return;
        };
        let bytes = std::fs::read(&p).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cut = dir.path().join("cut.pt");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let err = load_state_dict(&cut).unwrap_err().to_string();
        assert!(err.contains("cut.pt"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn png_is_not_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("face.png");
        image::RgbImage::new(4, 4).save(&png).unwrap();
        let err = load_state_dict(&png).unwrap_err().to_string();
        assert!(err.contains("PNG"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = load_state_dict("/nonexistent/w.ckpt").unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/w.ckpt"));
    }

    #[test]
    fn reports_mismatches_by_name_with_both_shapes() {
        let mut tensors = HashMap::new();
        tensors.insert(
            "a.weight".to_owned(),
            Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        tensors.insert(
            "extra".to_owned(),
            Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
        );
        let sd = StateDict {
            tensors,
            path: PathBuf::from("w.safetensors"),
        };
        let err = build_checked(&sd, DType::F32, &Device::Cpu, |vb| {
            vb.get((3, 3), "a.weight")?;
            vb.get(5, "b.bias")
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`a.weight` checkpoint [2, 3] vs config [3, 3]"),
            "{err}"
        );
        assert!(err.contains("missing (1): `b.bias` [5]"), "{err}");
        assert!(err.contains("unexpected (1): `extra` [4]"), "{err}");
    }
}
