//! Face-recognition embeddings as curation and export read and write them: an `N × D` f32
//! matrix whose row `i` belongs to image `i` of a dataset (ImageFolder order: identities
//! ascending, samples ascending).
//!
//! Files: numpy `.npy` (`<f4` or `<f8`, shape `(N, D)`) or safetensors with a tensor named
//! `embeddings` (or a single F32/F64 `[N, D]` tensor).

use crate::identity::Contexts;
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::path::Path;

/// Row-major `len × dim` embeddings.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// Width of each row.
    pub dim: usize,
    /// `len × dim` values.
    pub data: Vec<f32>,
}

/// Name of the tensor read from (and written to) safetensors files.
pub const EMBEDDINGS_TENSOR: &str = "embeddings";

impl Embeddings {
    /// Builds embeddings from row-major data.
    pub fn new(dim: usize, data: Vec<f32>) -> Result<Self> {
        ensure!(dim > 0, "embedding width must be positive");
        ensure!(
            data.len().is_multiple_of(dim),
            "{} values do not make rows of width {dim}",
            data.len()
        );
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            bail!(
                "embedding row {} has a non-finite value at column {}",
                i / dim,
                i % dim
            );
        }
        Ok(Self { dim, data })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.data.len() / self.dim.max(1)
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Row `i`.
    ///
    /// # Panics
    /// When `i >= self.len()`, like slice indexing.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// The rows scaled to unit L2 norm (all-zero rows stay zero).
    pub fn normalized(&self) -> Self {
        let mut data = self.data.clone();
        for row in data.chunks_exact_mut(self.dim.max(1)) {
            normalize(row);
        }
        Self {
            dim: self.dim,
            data,
        }
    }

    /// The rows `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Self {
        let mut data = Vec::with_capacity(indices.len() * self.dim);
        for &i in indices {
            data.extend_from_slice(self.row(i));
        }
        Self {
            dim: self.dim,
            data,
        }
    }

    /// Loads `.npy` or safetensors (recognised from the content); errors name the file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read embeddings {}", path.display()))?;
        Self::from_bytes(&bytes).map_err(|e| anyhow!("embeddings {}: {e:#}", path.display()))
    }

    /// Parses `.npy` or safetensors bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.starts_with(b"\x93NUMPY") {
            let dim = npy_width(bytes)?;
            let c = Contexts::from_bytes(bytes, dim)?;
            return Self::new(c.dim, c.data);
        }
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|_| anyhow!("not a .npy or safetensors file"))?;
        let names = st.names();
        let name = if names.contains(&EMBEDDINGS_TENSOR) {
            EMBEDDINGS_TENSOR.to_string()
        } else if names.len() == 1 {
            names[0].to_string()
        } else {
            bail!("safetensors file has no '{EMBEDDINGS_TENSOR}' tensor");
        };
        let view = st.tensor(&name)?;
        let [n, d] = view.shape() else {
            bail!(
                "tensor '{name}' has shape {:?}, expected [N, D]",
                view.shape()
            );
        };
        let data: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            safetensors::Dtype::F64 => view
                .data()
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    f64::from_le_bytes(b) as f32
                })
                .collect(),
            other => bail!("tensor '{name}' has dtype {other:?}, expected F32 or F64"),
        };
        ensure!(data.len() == n * d, "tensor '{name}' is truncated");
        Self::new(*d, data)
    }

    /// `.npy` bytes (`<f4`, shape `(N, D)`).
    pub fn to_npy_bytes(&self) -> Result<Vec<u8>> {
        let names = (0..self.len()).map(|i| i.to_string()).collect();
        Ok(Contexts::new(names, self.dim, self.data.clone())?.to_npy_bytes())
    }
}

/// Loads the embeddings of a dataset whose images are `files` (`<identity>/<file>` paths
/// relative to the dataset folder, in dataset order).
///
/// An embeddings file written by `analyze` ([`crate::analysis::embed::Embeddings`]) names
/// the file of every row; rows are matched to `files` by those names (extra rows are
/// ignored, a missing one is an error). Other files (`.npy`, safetensors without names)
/// must have one row per image, in dataset order.
pub fn load_for_files(path: &Path, files: &[String]) -> Result<Embeddings> {
    if let Ok(named) = crate::analysis::embed::Embeddings::load(path) {
        if named.files.iter().all(|f| f.contains('/')) {
            let index: std::collections::HashMap<&str, usize> = named
                .files
                .iter()
                .enumerate()
                .map(|(i, f)| (f.as_str(), i))
                .collect();
            let mut data = Vec::with_capacity(files.len() * named.dim);
            for f in files {
                let i = index.get(f.as_str()).ok_or_else(|| {
                    anyhow!(
                        "embeddings {} have no row for {f}; embed this dataset again",
                        path.display()
                    )
                })?;
                data.extend_from_slice(named.row(*i));
            }
            return Embeddings::new(named.dim, data)
                .map_err(|e| anyhow!("embeddings {}: {e:#}", path.display()));
        }
    }
    let e = Embeddings::load(path)?;
    ensure!(
        e.len() == files.len(),
        "embeddings {} have {} rows but the dataset has {} images",
        path.display(),
        e.len(),
        files.len()
    );
    Ok(e)
}

/// Loads a reference set for the leakage check (`.npy`, safetensors or context pickles;
/// see [`crate::analysis::report::ReferenceSet`]) of width `dim`.
pub fn load_reference(path: &Path, dim: usize) -> Result<Embeddings> {
    let r = crate::analysis::report::ReferenceSet::load(path, dim)?;
    Embeddings::new(r.dim, r.data).map_err(|e| anyhow!("reference {}: {e:#}", path.display()))
}

/// Scales `v` to unit L2 norm in place (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        for x in v {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
}

/// Width `D` of a 2-D `.npy` array (from its header's `shape`).
fn npy_width(bytes: &[u8]) -> Result<usize> {
    let (len, start) = match bytes.get(6) {
        Some(1) => (
            bytes
                .get(8..10)
                .map(|b| usize::from(b[0]) | usize::from(b[1]) << 8),
            10,
        ),
        Some(2 | 3) => (
            bytes
                .get(8..12)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize),
            12,
        ),
        _ => (None, 0),
    };
    let header = len
        .and_then(|l| bytes.get(start..start + l))
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| anyhow!(".npy header is truncated or unsupported"))?;
    let shape = header
        .split("shape")
        .nth(1)
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| anyhow!(".npy header has no shape"))?;
    let dims: Vec<&str> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    match dims.as_slice() {
        [_, d] => d
            .parse()
            .map_err(|_| anyhow!(".npy shape ({shape}) is not numeric")),
        _ => bail!(".npy array has shape ({shape}), expected (N, D)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip_and_normalisation() {
        let e = Embeddings::new(2, vec![3.0, 4.0, 0.0, 0.0, -1.0, 0.0]).unwrap();
        let back = Embeddings::from_bytes(&e.to_npy_bytes().unwrap()).unwrap();
        assert_eq!(back, e);
        let n = e.normalized();
        assert_eq!(n.row(0), &[0.6, 0.8]);
        assert_eq!(n.row(1), &[0.0, 0.0]);
        assert_eq!(e.select(&[2, 0]).data, vec![-1.0, 0.0, 3.0, 4.0]);
        assert!(Embeddings::from_bytes(b"hello").is_err());
        assert!(Embeddings::new(2, vec![f32::NAN, 0.0]).is_err());
    }
}
