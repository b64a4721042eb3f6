//! Identity contexts: the L2-normalised face-recognition embeddings that condition the
//! diffusion model, one row per identity.
//!
//! Readable formats (chosen by magic bytes, never by file extension):
//! - the reference's context files: a `torch.save` zip archive (named `.npy`) whose
//!   `data.pkl` is a pickle of `{name: numpy float32[512]}`; a plain pickle (protocol 2) of
//!   the same dict is accepted too. Rows keep the dict's insertion order, which is the order
//!   the reference samples in (`list(contexts.keys())[:n]`);
//! - real numpy `.npy` files (N×D or D, float32/float64, format versions 1–3);
//! - safetensors files holding a tensor named `contexts` (or exactly one tensor).
//!
//! Writable formats: `.npy` (little-endian f32, N×D) and safetensors (`contexts`, with the
//! row names kept as JSON in the `names` metadata entry).
//!
//! Synthetic identities ([`uniform_context`]) are uniform on the unit sphere and
//! reproducible per identity index, independent of how many are drawn at once.

use crate::files::write_atomic;
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::pickle::{Object, Stack};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::StandardNormal;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::Path;

/// Width of the reference's identity contexts (ElasticFace embeddings).
pub const DEFAULT_CONTEXT_DIM: usize = 512;

/// Name of the tensor written to (and preferred when reading) safetensors context files.
pub const SAFETENSORS_TENSOR: &str = "contexts";

const NPY_MAGIC: &[u8] = b"\x93NUMPY";
const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";
const JPEG_MAGIC: &[u8] = b"\xff\xd8\xff";

/// A set of identity contexts: `names[i]` labels row `i` of the row-major `N × dim` `data`.
#[derive(Debug, Clone, PartialEq)]
pub struct Contexts {
    /// One name per row (the dict key for reference files, the row index otherwise).
    pub names: Vec<String>,
    /// Width of each context vector.
    pub dim: usize,
    /// Row-major `names.len() × dim` values.
    pub data: Vec<f32>,
}

/// On-disk layout of a context file, as recognised from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextFormat {
    /// `torch.save` zip archive holding a pickled `{name: ndarray}` dict.
    TorchZip,
    /// Plain pickle of a `{name: ndarray}` dict.
    Pickle,
    /// numpy `.npy` array.
    Npy,
    /// safetensors file.
    Safetensors,
}

impl ContextFormat {
    /// Recognises the format from the file's leading bytes.
    pub fn detect(bytes: &[u8]) -> Result<Self> {
        if bytes.starts_with(NPY_MAGIC) {
            return Ok(Self::Npy);
        }
        if bytes.starts_with(ZIP_MAGIC) {
            return Ok(Self::TorchZip);
        }
        if bytes.len() >= 2 && bytes[0] == 0x80 && bytes[1] <= 5 {
            return Ok(Self::Pickle);
        }
        if looks_like_safetensors(bytes) {
            return Ok(Self::Safetensors);
        }
        if bytes.starts_with(PNG_MAGIC) || bytes.starts_with(JPEG_MAGIC) {
            bail!("this is an image, not an identity context file");
        }
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        bail!(
            "unrecognised identity context format (first bytes {}); expected torch.save zip, \
             pickle, .npy or safetensors",
            head.join(" ")
        )
    }
}

fn looks_like_safetensors(bytes: &[u8]) -> bool {
    match bytes.get(..9) {
        Some(head) => {
            let n = u64::from_le_bytes(head[..8].try_into().unwrap_or([0; 8]));
            head[8] == b'{' && n >= 2 && n <= (bytes.len() as u64).saturating_sub(8)
        }
        None => false,
    }
}

impl Contexts {
    /// Builds contexts from names and row-major data, checking that the sizes agree.
    pub fn new(names: Vec<String>, dim: usize, data: Vec<f32>) -> Result<Self> {
        ensure!(dim > 0, "context width must be positive");
        ensure!(
            data.len() == names.len() * dim,
            "context data has {} values; expected {} rows × {dim} = {}",
            data.len(),
            names.len(),
            names.len() * dim
        );
        Ok(Self { names, dim, data })
    }

    /// Builds contexts from equally long rows, naming them `"0"`, `"1"`, ….
    pub fn from_rows(rows: &[Vec<f32>]) -> Result<Self> {
        let dim = rows.first().map_or(0, Vec::len);
        if let Some((i, r)) = rows.iter().enumerate().find(|(_, r)| r.len() != dim) {
            bail!("context row {i} has width {}; row 0 has {dim}", r.len());
        }
        let names = (0..rows.len()).map(|i| i.to_string()).collect();
        Self::new(names, dim, rows.concat())
    }

    /// Synthetic identities `first_identity .. first_identity + n` (see [`uniform_context`]),
    /// named by their identity index.
    pub fn uniform(seed: u64, first_identity: usize, n: usize, dim: usize) -> Result<Self> {
        let names = (first_identity..first_identity + n)
            .map(|k| k.to_string())
            .collect();
        let data = uniform_contexts(seed, first_identity, n, dim).concat();
        Self::new(names, dim, data)
    }

    /// Loads a context file of any supported format (detected from its magic bytes) and
    /// validates it: width must equal `expected_dim` and every value must be finite.
    ///
    /// Errors are one line and name the file.
    pub fn load(path: impl AsRef<Path>, expected_dim: usize) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read identity context file {}", path.display()))?;
        Self::from_bytes(&bytes, expected_dim)
            .map_err(|e| anyhow!("identity context file {}: {e:#}", path.display()))
    }

    /// Parses and validates the contents of a context file (see [`Contexts::load`]).
    pub fn from_bytes(bytes: &[u8], expected_dim: usize) -> Result<Self> {
        let contexts = match ContextFormat::detect(bytes)? {
            ContextFormat::TorchZip => parse_torch_zip(bytes)?,
            ContextFormat::Pickle => {
                let protocol = bytes[1];
                ensure!(
                    protocol <= 2,
                    "plain pickles of protocol {protocol} are not supported (only protocol 2, \
                     as torch.save writes); re-save with torch.save, numpy.save or safetensors"
                );
                parse_pickle(bytes)?
            }
            ContextFormat::Npy => parse_npy(bytes)?,
            ContextFormat::Safetensors => parse_safetensors(bytes)?,
        };
        contexts.validate(expected_dim)?;
        Ok(contexts)
    }

    /// Checks the width against `expected_dim`, that there is at least one row and that all
    /// values are finite.
    pub fn validate(&self, expected_dim: usize) -> Result<()> {
        ensure!(
            self.dim == expected_dim,
            "context width is {} but {expected_dim} was expected",
            self.dim
        );
        ensure!(!self.is_empty(), "holds no contexts");
        for (i, row) in self.rows().enumerate() {
            if let Some(j) = row.iter().position(|v| !v.is_finite()) {
                bail!(
                    "row {i} (name '{}') has a non-finite value {} at column {j}",
                    self.names[i],
                    row[j]
                );
            }
        }
        Ok(())
    }

    /// Number of contexts (rows).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when there are no contexts.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Row `i` as a slice of `dim` values.
    ///
    /// # Panics
    /// When `i >= self.len()`, like slice indexing.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// Iterates over the rows in order.
    pub fn rows(&self) -> impl Iterator<Item = &[f32]> {
        self.data.chunks_exact(self.dim.max(1))
    }

    /// Writes a version-1.0 `.npy` file (`<f4`, C order, shape `(N, dim)`) atomically.
    /// Row names are not stored.
    pub fn save_npy(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        write_atomic(path, &self.to_npy_bytes())
            .with_context(|| format!("cannot write contexts to {}", path.display()))
    }

    /// Serialises to `.npy` bytes (see [`Contexts::save_npy`]).
    pub fn to_npy_bytes(&self) -> Vec<u8> {
        let dict = format!(
            "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}",
            self.len(),
            self.dim
        );
        // magic(6) + version(2) + header length(2) + dict + padding + '\n', multiple of 64.
        let unpadded = 10 + dict.len() + 1;
        let header_len = dict.len() + 1 + (64 - unpadded % 64) % 64;
        let mut out = Vec::with_capacity(10 + header_len + self.data.len() * 4);
        out.extend_from_slice(NPY_MAGIC);
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header_len as u16).to_le_bytes());
        out.extend_from_slice(dict.as_bytes());
        out.resize(10 + header_len - 1, b' ');
        out.push(b'\n');
        out.extend(self.data.iter().flat_map(|v| v.to_le_bytes()));
        out
    }

    /// Writes a safetensors file with an F32 `[N, dim]` tensor `contexts`; the row names are
    /// kept as a JSON list in the `names` metadata entry. Atomic.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.to_safetensors_bytes()
            .and_then(|bytes| write_atomic(path, &bytes))
            .with_context(|| format!("cannot write contexts to {}", path.display()))
    }

    /// Serialises to safetensors bytes (see [`Contexts::save_safetensors`]).
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        let raw: Vec<u8> = self.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![self.len(), self.dim],
            &raw,
        )?;
        let meta = HashMap::from([("names".to_string(), serde_json::to_string(&self.names)?)]);
        Ok(safetensors::serialize(
            [(SAFETENSORS_TENSOR, view)],
            Some(meta),
        )?)
    }
}

// ---------------------------------------------------------------------------------------
// torch.save zip / pickle

fn parse_torch_zip(bytes: &[u8]) -> Result<Contexts> {
    // zip's default archive-offset detection rejects some valid torch files.
    let config = zip::read::Config {
        archive_offset: zip::read::ArchiveOffset::Known(0),
    };
    let mut archive = zip::ZipArchive::with_config(config, Cursor::new(bytes))
        .map_err(|e| anyhow!("not a readable torch zip archive: {e}"))?;
    let pkl_name = archive
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
        .map(|n| n.into_owned())
        .ok_or_else(|| anyhow!("torch zip archive has no data.pkl entry"))?;
    let mut pkl = Vec::new();
    archive
        .by_name(&pkl_name)
        .and_then(|mut f| f.read_to_end(&mut pkl).map_err(Into::into))
        .map_err(|e| anyhow!("cannot read {pkl_name} from the zip archive: {e}"))?;
    parse_pickle(&pkl).with_context(|| format!("in {pkl_name}"))
}

/// Parses a pickled `{name: ndarray}` dict, keeping insertion order.
fn parse_pickle(bytes: &[u8]) -> Result<Contexts> {
    let (root, key_order) = run_pickle(bytes)?;
    let entries = match root {
        Object::Dict(entries) => entries,
        other => bail!(
            "pickle holds a {}, expected a dict of name -> float32 array",
            object_kind(&other)
        ),
    };
    let mut by_name: HashMap<String, Object> = HashMap::with_capacity(entries.len());
    for (key, value) in entries {
        let name = key_name(&key)?;
        if by_name.insert(name.clone(), value).is_some() {
            bail!("pickle dict repeats the key '{name}'");
        }
    }
    ensure!(
        key_order.len() == by_name.len(),
        "pickle dict has {} entries but {} keys were seen while reading it",
        by_name.len(),
        key_order.len()
    );
    let mut names = Vec::with_capacity(key_order.len());
    let mut data = Vec::new();
    let mut dim = None;
    for name in key_order {
        let value = by_name
            .remove(&name)
            .ok_or_else(|| anyhow!("pickle dict key '{name}' seen twice"))?;
        let row = ndarray_vector(value).with_context(|| format!("key '{name}'"))?;
        match dim {
            None => dim = Some(row.len()),
            Some(d) if d != row.len() => {
                bail!(
                    "key '{name}' has width {}, earlier keys have {d}",
                    row.len()
                )
            }
            Some(_) => {}
        }
        data.extend(row);
        names.push(name);
    }
    Contexts::new(names, dim.unwrap_or(DEFAULT_CONTEXT_DIM), data)
}

/// Runs candle's pickle machine op by op. Besides the final object it returns the keys of
/// the outermost dict in insertion order, read off the stack before each SETITEM(S): the
/// machine's own dict does not keep that order for SETITEMS batches.
fn run_pickle(bytes: &[u8]) -> Result<(Object, Vec<String>)> {
    let mut reader: &[u8] = bytes;
    let mut stack = Stack::empty();
    let mut keys = Vec::new();
    loop {
        let Some(&op) = reader.first() else {
            bail!("pickle is truncated (no STOP opcode)");
        };
        match op {
            b'u' | b's' => record_top_level_keys(op, stack.stack(), &mut keys)?,
            // BINUNICODE: refuse lengths beyond the end before the machine allocates them.
            b'X' => {
                let len = reader
                    .get(1..5)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                    .ok_or_else(|| anyhow!("pickle is truncated"))?;
                ensure!(reader.len() >= 5 + len, "pickle is truncated");
            }
            _ => {}
        }
        let pos = bytes.len() - reader.len();
        let stop = stack.read(&mut reader).map_err(|e| {
            anyhow!(
                "bad pickle at byte {pos} (opcode 0x{op:02x}): {}",
                first_line(&e)
            )
        })?;
        if stop {
            break;
        }
    }
    let root = stack
        .finalize()
        .map_err(|e| anyhow!("bad pickle: {}", first_line(&e)))?;
    Ok((root, keys))
}

/// First line of an error's message (candle appends a backtrace when one was captured).
fn first_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// Before SETITEMS (`u`) or SETITEM (`s`) that targets the bottom-most stack object (the
/// pickled root), appends the keys about to be inserted, in order.
fn record_top_level_keys(op: u8, stack: &[Object], keys: &mut Vec<String>) -> Result<()> {
    if op == b'u' {
        let Some(mark) = stack.iter().rposition(|o| *o == Object::Mark) else {
            return Ok(()); // the machine reports the missing mark itself
        };
        if mark == 1 {
            for key in stack[mark + 1..].iter().step_by(2) {
                keys.push(key_name(key)?);
            }
        }
    } else if stack.len() == 3 {
        keys.push(key_name(&stack[1])?);
    }
    Ok(())
}

fn key_name(key: &Object) -> Result<String> {
    match key {
        Object::Unicode(s) => Ok(s.clone()),
        Object::Int(i) => Ok(i.to_string()),
        Object::Long(i) => Ok(i.to_string()),
        other => bail!("dict key is a {}, expected a string", object_kind(other)),
    }
}

fn object_kind(o: &Object) -> &'static str {
    match o {
        Object::Class { .. } => "class",
        Object::Int(_) | Object::Long(_) => "int",
        Object::Float(_) => "float",
        Object::Unicode(_) => "str",
        Object::Bool(_) => "bool",
        Object::None => "None",
        Object::Tuple(_) => "tuple",
        Object::List(_) => "list",
        Object::Mark => "mark",
        Object::Dict(_) => "dict",
        Object::Reduce { .. } => "reduced object",
        Object::Build { .. } => "built object",
        Object::PersistentLoad(_) => "torch storage (tensor)",
    }
}

/// Decodes a pickled numpy array of shape `[D]` or `[1, D]` (float32/float64).
fn ndarray_vector(obj: Object) -> Result<Vec<f32>> {
    let (callable, state) = match obj {
        Object::Build { callable, args } => (*callable, *args),
        other => bail!("value is a {}, expected a numpy array", object_kind(&other)),
    };
    match callable {
        Object::Reduce { callable, .. } => match *callable {
            Object::Class {
                module_name,
                class_name,
            } if class_name == "_reconstruct" && module_name.ends_with("multiarray") => {}
            _ => bail!("value is not a numpy array (no numpy _reconstruct)"),
        },
        _ => bail!("value is not a numpy array"),
    }
    let mut state = match state {
        Object::Tuple(t) if t.len() == 5 || t.len() == 4 => t,
        _ => bail!("numpy array state is not a (version, shape, dtype, fortran, data) tuple"),
    };
    let raw = state
        .pop()
        .map(pickled_bytes)
        .transpose()?
        .unwrap_or_default();
    let _fortran = state.pop();
    let dtype = state.pop().map(numpy_dtype).transpose()?;
    let shape = state.pop().map(shape_of).transpose()?.unwrap_or_default();
    let (kind, big_endian) = dtype.ok_or_else(|| anyhow!("numpy array has no dtype"))?;
    let width = match shape.as_slice() {
        [d] | [1, d] => *d,
        other => bail!("array has shape {other:?}, expected [D] or [1, D]"),
    };
    decode_floats(&raw, &kind, big_endian, width)
}

fn shape_of(obj: Object) -> Result<Vec<usize>> {
    match obj {
        Object::Tuple(dims) => dims
            .into_iter()
            .map(|d| match d {
                Object::Int(v) if v >= 0 => Ok(v as usize),
                Object::Long(v) if v >= 0 => Ok(v as usize),
                _ => bail!("numpy array shape holds a non-integer"),
            })
            .collect(),
        other => bail!("numpy array shape is a {}", object_kind(&other)),
    }
}

/// Reads a pickled `numpy.dtype`: returns (type code such as "f4", big-endian?).
fn numpy_dtype(obj: Object) -> Result<(String, bool)> {
    let (reduce, state) = match obj {
        Object::Build { callable, args } => (*callable, Some(*args)),
        other => (other, None),
    };
    let code = match reduce {
        Object::Reduce { callable, args } => match (*callable, *args) {
            (Object::Class { class_name, .. }, Object::Tuple(mut a))
                if class_name == "dtype" && !a.is_empty() =>
            {
                match a.swap_remove(0) {
                    Object::Unicode(s) => s,
                    _ => bail!("numpy dtype code is not a string"),
                }
            }
            _ => bail!("numpy array dtype is not a numpy.dtype"),
        },
        _ => bail!("numpy array dtype is not a numpy.dtype"),
    };
    let big_endian = match state {
        Some(Object::Tuple(s)) => matches!(s.get(1), Some(Object::Unicode(e)) if e == ">"),
        _ => false,
    };
    Ok((code, big_endian))
}

/// Undoes pickle's `_codecs.encode(<latin-1 str>, 'latin1')` encoding of `bytes`.
fn pickled_bytes(obj: Object) -> Result<Vec<u8>> {
    match obj {
        Object::Reduce { callable, args } => match (*callable, *args) {
            (Object::Class { class_name, .. }, Object::Tuple(a)) if class_name == "encode" => {
                match a.first() {
                    Some(Object::Unicode(s)) => s
                        .chars()
                        .map(|c| u8::try_from(c as u32))
                        .collect::<Result<Vec<u8>, _>>()
                        .map_err(|_| anyhow!("array data is not latin-1 encoded")),
                    _ => bail!("array data is not an encoded string"),
                }
            }
            _ => bail!("array data is not _codecs.encode(...)"),
        },
        other => bail!("array data is a {}, expected bytes", object_kind(&other)),
    }
}

/// Decodes `width` floats of numpy type `kind` ("f4"/"f8", optionally with a byte-order
/// prefix) from `raw`.
fn decode_floats(raw: &[u8], kind: &str, big_endian: bool, width: usize) -> Result<Vec<f32>> {
    let (big_endian, code) = match kind.as_bytes().first() {
        Some(b'<') | Some(b'|') | Some(b'=') => (false, &kind[1..]),
        Some(b'>') => (true, &kind[1..]),
        _ => (big_endian, kind),
    };
    let size = match code {
        "f4" => 4,
        "f8" => 8,
        other => bail!("array dtype '{other}' is not float32 or float64"),
    };
    ensure!(
        raw.len() == width * size,
        "array data has {} bytes; expected {width} × {size}",
        raw.len()
    );
    Ok(raw
        .chunks_exact(size)
        .map(|c| match (size, big_endian) {
            (4, false) => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            (4, true) => f32::from_be_bytes([c[0], c[1], c[2], c[3]]),
            (_, false) => f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32,
            (_, true) => f64::from_be_bytes(c.try_into().unwrap_or([0; 8])) as f32,
        })
        .collect())
}

// ---------------------------------------------------------------------------------------
// .npy

struct NpyHeader {
    descr: String,
    fortran: bool,
    shape: Vec<usize>,
}

fn parse_npy(bytes: &[u8]) -> Result<Contexts> {
    let (header, data) = split_npy(bytes)?;
    let (rows, dim) = match header.shape.as_slice() {
        [n, d] => (*n, *d),
        [d] => (1, *d),
        other => bail!(".npy array has shape {other:?}, expected (N, D)"),
    };
    let count = rows
        .checked_mul(dim)
        .ok_or_else(|| anyhow!(".npy shape overflows"))?;
    let itemsize = if header.descr.ends_with('8') { 8 } else { 4 };
    let needed = count.saturating_mul(itemsize);
    ensure!(
        data.len() >= needed,
        ".npy file is truncated: shape {:?} needs {needed} data bytes, found {}",
        header.shape,
        data.len()
    );
    let values = decode_floats(&data[..needed], &header.descr, false, count)?;
    let values = if header.fortran && rows > 1 {
        (0..rows * dim)
            .map(|idx| values[(idx % dim) * rows + idx / dim])
            .collect()
    } else {
        values
    };
    let names = (0..rows).map(|i| i.to_string()).collect();
    Contexts::new(names, dim, values)
}

fn split_npy(bytes: &[u8]) -> Result<(NpyHeader, &[u8])> {
    let major = *bytes
        .get(6)
        .ok_or_else(|| anyhow!(".npy header is truncated"))?;
    let (len, start) = match major {
        1 => (
            bytes
                .get(8..10)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize),
            10,
        ),
        2 | 3 => (
            bytes
                .get(8..12)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize),
            12,
        ),
        v => bail!(".npy format version {v} is not supported"),
    };
    let len = len.ok_or_else(|| anyhow!(".npy header is truncated"))?;
    let text = bytes
        .get(start..start + len)
        .ok_or_else(|| anyhow!(".npy header is truncated"))?;
    let text = std::str::from_utf8(text).map_err(|_| anyhow!(".npy header is not text"))?;
    Ok((parse_npy_header(text)?, &bytes[start + len..]))
}

/// Parses the Python-literal header dict, e.g.
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (8, 512), }`.
fn parse_npy_header(text: &str) -> Result<NpyHeader> {
    let value_after = |key: &str| -> Result<&str> {
        let at = text
            .find(&format!("'{key}'"))
            .or_else(|| text.find(&format!("\"{key}\"")))
            .ok_or_else(|| anyhow!(".npy header lacks '{key}'"))?;
        let rest = &text[at + key.len() + 2..];
        let colon = rest
            .find(':')
            .ok_or_else(|| anyhow!(".npy header is malformed near '{key}'"))?;
        Ok(rest[colon + 1..].trim_start())
    };
    let descr_text = value_after("descr")?;
    let quote = descr_text
        .chars()
        .next()
        .filter(|c| *c == '\'' || *c == '"')
        .ok_or_else(|| {
            anyhow!(".npy dtype is not a simple type string (structured arrays are not supported)")
        })?;
    let descr: String = descr_text[1..]
        .chars()
        .take_while(|c| *c != quote)
        .collect();
    let fortran = value_after("fortran_order")?.starts_with("True");
    let shape_text = value_after("shape")?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| anyhow!(".npy header shape is malformed"))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| anyhow!(".npy header shape entry '{s}' is not an integer"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(NpyHeader {
        descr,
        fortran,
        shape,
    })
}

// ---------------------------------------------------------------------------------------
// safetensors

fn parse_safetensors(bytes: &[u8]) -> Result<Contexts> {
    let tensors = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow!("invalid safetensors file: {e}"))?;
    let names = tensors.names();
    let name = if names.contains(&SAFETENSORS_TENSOR) {
        SAFETENSORS_TENSOR.to_string()
    } else if names.len() == 1 {
        names[0].to_string()
    } else {
        let mut listed: Vec<&str> = names.iter().copied().take(5).collect();
        listed.sort_unstable();
        bail!(
            "safetensors file has no '{SAFETENSORS_TENSOR}' tensor and {} tensors ({}…)",
            names.len(),
            listed.join(", ")
        );
    };
    let view = tensors.tensor(&name)?;
    let (rows, dim) = match view.shape() {
        [n, d] => (*n, *d),
        [d] => (1, *d),
        other => bail!("tensor '{name}' has shape {other:?}, expected [N, D]"),
    };
    let descr = match view.dtype() {
        safetensors::Dtype::F32 => "<f4",
        safetensors::Dtype::F64 => "<f8",
        other => bail!("tensor '{name}' has dtype {other:?}, expected F32 or F64"),
    };
    let data = decode_floats(view.data(), descr, false, rows * dim)?;
    let row_names =
        stored_names(bytes, rows).unwrap_or_else(|| (0..rows).map(|i| i.to_string()).collect());
    Contexts::new(row_names, dim, data)
}

/// Row names from the `names` metadata entry, when present and of the right length.
fn stored_names(bytes: &[u8], rows: usize) -> Option<Vec<String>> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).ok()?;
    let json = meta.metadata().as_ref()?.get("names")?;
    let names: Vec<String> = serde_json::from_str(json).ok()?;
    (names.len() == rows).then_some(names)
}

// ---------------------------------------------------------------------------------------
// synthetic identities

/// ChaCha20 seed of synthetic identity `k`: SHA-256 over `seed` (u64 little-endian), the
/// ASCII bytes `identity`, then `k` (u64 little-endian).
pub fn identity_stream_seed(seed: u64, k: u64) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(seed.to_le_bytes());
    hasher.update(b"identity");
    hasher.update(k.to_le_bytes());
    hasher.finalize().into()
}

/// Synthetic identity `k`: `dim` standard-normal draws from the ChaCha20 stream keyed by
/// [`identity_stream_seed`]`(seed, k)`, normalised to unit length (uniform on the sphere).
/// Drawn and normalised in f64, stored as f32.
pub fn uniform_context(seed: u64, k: u64, dim: usize) -> Vec<f32> {
    if dim == 0 {
        return Vec::new();
    }
    let mut rng = ChaCha20Rng::from_seed(identity_stream_seed(seed, k));
    loop {
        // An all-zero draw has probability zero; redraw rather than divide by zero.
        let v: Vec<f64> = (0..dim).map(|_| rng.sample(StandardNormal)).collect();
        if let Some(unit) = normalised_f64(&v) {
            return unit.into_iter().map(|x| x as f32).collect();
        }
    }
}

/// Synthetic identities `first_identity .. first_identity + n` (see [`uniform_context`]);
/// identity `k` is the same whatever `first_identity` and `n` are.
pub fn uniform_contexts(seed: u64, first_identity: usize, n: usize, dim: usize) -> Vec<Vec<f32>> {
    (first_identity..first_identity + n)
        .map(|k| uniform_context(seed, k as u64, dim))
        .collect()
}

/// Spherical interpolation between the directions of `a` and `b` (both normalised first),
/// `t = 0` giving `a` and `t = 1` giving `b`; the result has unit length. Falls back to a
/// normalised linear interpolation when the two directions (nearly) coincide.
pub fn slerp(a: &[f32], b: &[f32], t: f32) -> Result<Vec<f32>> {
    ensure!(
        a.len() == b.len(),
        "slerp: widths differ ({} vs {})",
        a.len(),
        b.len()
    );
    let a = normalised(a).ok_or_else(|| anyhow!("slerp: first vector has zero length"))?;
    let b = normalised(b).ok_or_else(|| anyhow!("slerp: second vector has zero length"))?;
    let t = f64::from(t);
    let dot: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| x * y)
        .sum::<f64>()
        .clamp(-1.0, 1.0);
    ensure!(
        dot > -1.0 + 1e-9,
        "slerp: the vectors are antipodal, so the path between them is undefined"
    );
    let omega = dot.acos();
    let (wa, wb) = if omega.sin().abs() < 1e-6 {
        (1.0 - t, t)
    } else {
        let s = omega.sin();
        (((1.0 - t) * omega).sin() / s, (t * omega).sin() / s)
    };
    let mixed: Vec<f64> = a.iter().zip(&b).map(|(x, y)| wa * x + wb * y).collect();
    let out = normalised_f64(&mixed)
        .ok_or_else(|| anyhow!("slerp: interpolated vector has zero length"))?;
    Ok(out.into_iter().map(|v| v as f32).collect())
}

fn normalised(v: &[f32]) -> Option<Vec<f64>> {
    normalised_f64(&v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>())
}

fn normalised_f64(v: &[f64]) -> Option<Vec<f64>> {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    (norm > 0.0 && norm.is_finite()).then(|| v.iter().map(|x| x / norm).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_expected_contexts(path: &Path) -> (Vec<usize>, Vec<f32>) {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("contexts").unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        let data = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (t.shape().to_vec(), data)
    }

    #[test]
    fn reference_torch_zip_matches_fixture() {
        let (Some(ctx_path), Some(exp_path)) = (
            crate::testutil::fixture("uniform8_contexts.npy"),
            crate::testutil::fixture("uniform8_contexts_expected.safetensors"),
        ) else {
            return;
        };
        let bytes = std::fs::read(&ctx_path).unwrap();
        assert_eq!(
            ContextFormat::detect(&bytes).unwrap(),
            ContextFormat::TorchZip
        );
        let ctx = Contexts::load(&ctx_path, 512).unwrap();
        let (shape, expected) = read_expected_contexts(&exp_path);
        assert_eq!(shape, vec![8, 512]);
        assert_eq!(ctx.dim, 512);
        assert_eq!(ctx.names, (0..8).map(|i| i.to_string()).collect::<Vec<_>>());
        assert_eq!(
            ctx.data, expected,
            "contexts differ from the fixture bit for bit"
        );
        for row in ctx.rows() {
            let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "reference rows are unit length");
        }
    }

    #[test]
    fn reference_file_with_wrong_expected_width_names_file_and_widths() {
        let Some(path) = crate::testutil::fixture("uniform8_contexts.npy") else {
            return;
        };
        let msg = format!("{}", Contexts::load(&path, 256).unwrap_err());
        assert!(msg.contains("uniform8_contexts.npy"), "{msg}");
        assert!(msg.contains("512") && msg.contains("256"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    // --- a small pickle writer mirroring torch.save's protocol-2 layout of numpy arrays ---

    fn unicode(out: &mut Vec<u8>, s: &str) {
        out.push(b'X');
        out.extend((s.len() as u32).to_le_bytes());
        out.extend(s.as_bytes());
    }

    fn latin1_bytes(out: &mut Vec<u8>, raw: &[u8]) {
        out.extend(b"c_codecs\nencode\n");
        let s: String = raw.iter().map(|&b| b as char).collect();
        unicode(out, &s);
        unicode(out, "latin1");
        out.extend([0x86, b'R']);
    }

    fn np_array(out: &mut Vec<u8>, values: &[f32]) {
        out.extend(b"cnumpy.core.multiarray\n_reconstruct\n");
        out.extend(b"cnumpy\nndarray\n");
        out.extend([b'K', 0, 0x85]);
        latin1_bytes(out, b"b");
        out.extend([0x87, b'R', b'(', b'K', 1, b'M']);
        out.extend((values.len() as u16).to_le_bytes());
        out.push(0x85);
        out.extend(b"cnumpy\ndtype\n");
        unicode(out, "f4");
        out.extend([0x89, 0x88, 0x87, b'R', b'(', b'K', 3]);
        unicode(out, "<");
        out.extend([b'N', b'N', b'N', b'J']);
        out.extend((-1i32).to_le_bytes());
        out.push(b'J');
        out.extend((-1i32).to_le_bytes());
        out.extend([b'K', 0, b't', b'b', 0x89]);
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        latin1_bytes(out, &raw);
        out.extend([b't', b'b']);
    }

    /// `{name: array}` with SETITEMS batches of `batch` entries, like pickle's batching.
    fn dict_pickle(entries: &[(&str, Vec<f32>)], batch: usize) -> Vec<u8> {
        let mut out = vec![0x80, 2, b'}'];
        for chunk in entries.chunks(batch) {
            out.push(b'(');
            for (name, values) in chunk {
                unicode(&mut out, name);
                np_array(&mut out, values);
            }
            out.push(b'u');
        }
        out.push(b'.');
        out
    }

    #[test]
    fn plain_pickle_keeps_insertion_order_across_batches() {
        let names = ["zeta", "alpha", "10", "2", "mid", "b"];
        let entries: Vec<(&str, Vec<f32>)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, vec![i as f32, 1.0, -0.5 * i as f32]))
            .collect();
        let bytes = dict_pickle(&entries, 4);
        assert_eq!(
            ContextFormat::detect(&bytes).unwrap(),
            ContextFormat::Pickle
        );
        let ctx = Contexts::from_bytes(&bytes, 3).unwrap();
        assert_eq!(ctx.names, names);
        for (i, row) in ctx.rows().enumerate() {
            assert_eq!(row, &[i as f32, 1.0, -0.5 * i as f32]);
        }
    }

    #[test]
    fn pickle_protocol_above_2_is_refused_clearly() {
        let mut bytes = dict_pickle(&[("a", vec![1.0])], 10);
        bytes[1] = 4;
        let msg = format!("{:#}", Contexts::from_bytes(&bytes, 1).unwrap_err());
        assert!(msg.contains("protocol 4"), "{msg}");
    }

    #[test]
    fn pickle_with_nan_names_the_row() {
        let entries = vec![("a", vec![0.0, 1.0]), ("b", vec![1.0, f32::NAN])];
        let err = Contexts::from_bytes(&dict_pickle(&entries, 10), 2).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("row 1") && msg.contains("'b'"), "{msg}");
    }

    #[test]
    fn npy_roundtrip_and_header_layout() {
        let ctx = Contexts::from_rows(&[vec![1.0, 2.0, 3.0], vec![-4.0, 5.5, 1e-8]]).unwrap();
        let bytes = ctx.to_npy_bytes();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        assert_eq!(bytes[10 + header_len - 1], b'\n');
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"));
        assert_eq!(bytes.len(), 10 + header_len + 24);
        let back = Contexts::from_bytes(&bytes, 3).unwrap();
        assert_eq!(back.data, ctx.data);
        assert_eq!(back.names, vec!["0", "1"]);
    }

    fn npy_bytes(major: u8, descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
        let dict = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}\n",
            if fortran { "True" } else { "False" }
        );
        let mut out = NPY_MAGIC.to_vec();
        out.extend([major, 0]);
        if major == 1 {
            out.extend((dict.len() as u16).to_le_bytes());
        } else {
            out.extend((dict.len() as u32).to_le_bytes());
        }
        out.extend(dict.as_bytes());
        out.extend(data);
        out
    }

    #[test]
    fn npy_reads_f64_fortran_and_version_2_and_3() {
        let vals = [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0]; // logical [[1,2,3],[4,5,6]]
        let c_f64: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let c = Contexts::from_bytes(&npy_bytes(2, "<f8", false, "(2, 3)", &c_f64), 3).unwrap();
        assert_eq!(c.data, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let fortran = [1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0];
        let f_f32: Vec<u8> = fortran.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f = Contexts::from_bytes(&npy_bytes(3, "<f4", true, "(2, 3)", &f_f32), 3).unwrap();
        assert_eq!(f.data, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let be: Vec<u8> = [0.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let b = Contexts::from_bytes(&npy_bytes(1, ">f4", false, "(2,)", &be), 2).unwrap();
        assert_eq!(b.data, vec![0.5, -2.0]);
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn npy_rejects_wrong_width_int_dtype_truncation_and_inf() {
        let data: Vec<u8> = [0f32; 6].iter().flat_map(|v| v.to_le_bytes()).collect();
        let wrong = npy_bytes(1, "<f4", false, "(2, 3)", &data);
        let msg = format!("{:#}", Contexts::from_bytes(&wrong, 512).unwrap_err());
        assert!(msg.contains('3') && msg.contains("512"), "{msg}");
        let ints = npy_bytes(1, "<i4", false, "(2, 3)", &data);
        assert!(Contexts::from_bytes(&ints, 3).is_err());
        let short = npy_bytes(1, "<f4", false, "(2, 3)", &data[..20]);
        let msg = format!("{:#}", Contexts::from_bytes(&short, 3).unwrap_err());
        assert!(msg.contains("truncated"), "{msg}");
        let mut inf = data.clone();
        inf[16..20].copy_from_slice(&f32::INFINITY.to_le_bytes());
        let msg = format!(
            "{:#}",
            Contexts::from_bytes(&npy_bytes(1, "<f4", false, "(2, 3)", &inf), 3).unwrap_err()
        );
        assert!(msg.contains("row 1"), "{msg}");
    }

    #[test]
    fn safetensors_roundtrip_keeps_names() {
        let mut ctx = Contexts::uniform(7, 3, 4, 16).unwrap();
        ctx.names = vec!["a".into(), "b".into(), "c".into(), "d".into()];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctx.bin");
        ctx.save_safetensors(&path).unwrap();
        let back = Contexts::load(&path, 16).unwrap();
        assert_eq!(back, ctx);
        let npy = dir.path().join("ctx.safetensors"); // extension is ignored
        ctx.save_npy(&npy).unwrap();
        let back = Contexts::load(&npy, 16).unwrap();
        assert_eq!(back.data, ctx.data);
    }

    #[test]
    fn safetensors_single_other_tensor_is_accepted() {
        let raw: Vec<u8> = [1f32, 0.0, 0.0, 1.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &raw)
            .unwrap();
        let bytes = safetensors::serialize([("embeddings", view)], None).unwrap();
        let ctx = Contexts::from_bytes(&bytes, 2).unwrap();
        assert_eq!(ctx.data, vec![1.0, 0.0, 0.0, 1.0]);
        assert_eq!(ctx.names, vec!["0", "1"]);
    }

    #[test]
    fn bad_inputs_give_one_line_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.npy");
        let msg = format!("{:#}", Contexts::load(&missing, 512).unwrap_err());
        assert!(msg.contains("missing.npy"), "{msg}");

        let png = dir.path().join("face.npy");
        std::fs::write(&png, b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR").unwrap();
        let msg = format!("{}", Contexts::load(&png, 512).unwrap_err());
        assert!(msg.contains("face.npy") && msg.contains("image"), "{msg}");

        if let Some(real) = crate::testutil::fixture("uniform8_contexts.npy") {
            let bytes = std::fs::read(real).unwrap();
            for cut in [10, 100, 5000, bytes.len() - 30] {
                let p = dir.path().join(format!("cut{cut}.npy"));
                std::fs::write(&p, &bytes[..cut]).unwrap();
                let msg = format!("{}", Contexts::load(&p, 512).unwrap_err());
                assert!(
                    msg.contains(&format!("cut{cut}.npy")) && !msg.contains('\n'),
                    "{msg}"
                );
            }
        }
        let entries = vec![("a", vec![0.0f32; 4])];
        let pickle = dict_pickle(&entries, 10);
        for cut in 1..pickle.len() {
            assert!(
                Contexts::from_bytes(&pickle[..cut], 4).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn uniform_identities_are_stable_unit_vectors() {
        let all = uniform_contexts(42, 0, 10, 512);
        let part = uniform_contexts(42, 6, 3, 512);
        assert_eq!(&all[6..9], part.as_slice());
        assert_eq!(uniform_context(42, 7, 512), all[7]);
        assert_ne!(uniform_contexts(43, 0, 1, 512)[0], all[0]);
        for v in &all {
            let norm: f64 = v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-6);
        }
        // Uniform on the sphere: pairwise cosines ~ N(0, 1/512), so |cos| < 0.25 here.
        for i in 0..10 {
            for j in i + 1..10 {
                let cos: f32 = all[i].iter().zip(&all[j]).map(|(a, b)| a * b).sum();
                assert!(cos.abs() < 0.25, "cos({i},{j}) = {cos}");
            }
        }
        // Coordinates of unit vectors have variance 1/dim.
        let var = all
            .iter()
            .flatten()
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            / 5120.0;
        assert!((var * 512.0 - 1.0).abs() < 1e-6);
    }

    #[test]
    fn stream_seed_is_sha256_of_documented_tuple() {
        let mut bytes = 5u64.to_le_bytes().to_vec();
        bytes.extend(b"identity");
        bytes.extend(9u64.to_le_bytes());
        let direct: [u8; 32] = Sha256::digest(&bytes).into();
        assert_eq!(identity_stream_seed(5, 9), direct);
        assert_ne!(identity_stream_seed(5, 9), identity_stream_seed(9, 5));
    }

    #[test]
    fn slerp_endpoints_midpoint_and_errors() {
        let a = [1.0f32, 0.0, 0.0];
        let b = [0.0f32, 2.0, 0.0];
        let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-6);
        assert!(close(&slerp(&a, &b, 0.0).unwrap(), &[1.0, 0.0, 0.0]));
        assert!(close(&slerp(&a, &b, 1.0).unwrap(), &[0.0, 1.0, 0.0]));
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!(close(&slerp(&a, &b, 0.5).unwrap(), &[h, h, 0.0]));
        // 1/3 of the way along a 90° arc is 30° from a.
        let third = slerp(&a, &b, 1.0 / 3.0).unwrap();
        assert!(close(
            &third,
            &[30f32.to_radians().cos(), 30f32.to_radians().sin(), 0.0]
        ));
        assert!(close(&slerp(&a, &a, 0.3).unwrap(), &a));
        assert!(slerp(&a, &[-1.0, 0.0, 0.0], 0.5).is_err());
        assert!(slerp(&a, &[0.0, 0.0], 0.5).is_err());
        assert!(slerp(&a, &[0.0, 0.0, 0.0], 0.5).is_err());
    }
}
