//! A single-input ONNX network on the CPU through tract, with one-line errors that name
//! the model file.

use crate::errors::one_line;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use tract_onnx::prelude::{
    DatumExt, Framework, InferenceModelExt, IntoTValue, Tensor, TypedRunnableModel,
};
use tract_onnx::tract_hir::infer::GenericFactoid;

/// One output of a run: its shape and row-major values.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// Tensor shape.
    pub shape: Vec<usize>,
    /// Row-major f32 values.
    pub data: Vec<f32>,
}

/// A loaded ONNX model with one f32 input of shape `1 × C × H × W`.
#[derive(Debug, Clone)]
pub struct OnnxNet {
    path: PathBuf,
    plan: Arc<TypedRunnableModel>,
    input: [usize; 4],
    outputs: Vec<Vec<usize>>,
}

/// Declared input dims of an ONNX file: `Some(n)` for a fixed dim, `None` for a symbolic one.
fn declared_input(
    path: &Path,
) -> Result<(tract_onnx::prelude::InferenceModel, Vec<Option<usize>>)> {
    if !path.is_file() {
        bail!("{}: model file not found", path.display());
    }
    let model = tract_onnx::onnx().model_for_path(path).map_err(|e| {
        anyhow!(
            "{}: not a readable ONNX model ({})",
            path.display(),
            one_line(&e)
        )
    })?;
    let inputs = model.input_outlets().map(|o| o.len()).unwrap_or(0);
    if inputs != 1 {
        bail!(
            "{}: the model has {inputs} inputs, expected exactly one image input",
            path.display()
        );
    }
    let fact = model
        .input_fact(0)
        .map_err(|e| anyhow!("{}: {}", path.display(), one_line(&e)))?;
    if fact.shape.is_open() {
        return Ok((model.clone(), Vec::new()));
    }
    let dims = fact
        .shape
        .dims()
        .map(|d| match d {
            GenericFactoid::Only(t) => t.to_i64().ok().and_then(|v| usize::try_from(v).ok()),
            GenericFactoid::Any => None,
        })
        .collect();
    Ok((model.clone(), dims))
}

fn fmt_dims(dims: &[Option<usize>]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .map(|d| d.map_or_else(|| "?".to_owned(), |v| v.to_string()))
        .collect();
    format!("[{}]", parts.join(", "))
}

impl OnnxNet {
    /// Loads `path` for inputs of `channels` channels. `size` (`(height, width)`) is required
    /// of the model when it declares a fixed size and fixes a symbolic one; with `None` the
    /// model's own fixed size is used. The batch is fixed to 1.
    ///
    /// # Errors
    /// One line naming the file: missing or unreadable (e.g. truncated) file, a model
    /// without exactly one 4-d input, a channel count or size other than expected.
    pub fn load(path: &Path, channels: usize, size: Option<(usize, usize)>) -> Result<Self> {
        let (model, dims) = declared_input(path)?;
        let p = path.display();
        if !dims.is_empty() && dims.len() != 4 {
            bail!(
                "{p}: input has shape {}, expected [N, {channels}, H, W]",
                fmt_dims(&dims)
            );
        }
        let get = |i: usize| dims.get(i).copied().flatten();
        if let Some(c) = get(1) {
            if c != channels {
                bail!(
                    "{p}: input has shape {}, expected [N, {channels}, H, W] ({c} channels instead of {channels})",
                    fmt_dims(&dims)
                );
            }
        }
        if let Some(b) = get(0) {
            if b != 1 {
                // A fixed batch other than 1 cannot be fed one image at a time.
                bail!(
                    "{p}: input has shape {}, expected batch 1 or a symbolic batch",
                    fmt_dims(&dims)
                );
            }
        }
        let (h, w) = match (size, get(2), get(3)) {
            (Some((h, w)), Some(mh), Some(mw)) if (h, w) != (mh, mw) => bail!(
                "{p}: input has shape {}, but {h}x{w} images were asked for",
                fmt_dims(&dims)
            ),
            (Some(s), _, _) => s,
            (None, Some(mh), Some(mw)) => (mh, mw),
            (None, _, _) => bail!(
                "{p}: input has shape {} with a symbolic size; give the input size in the model's descriptor",
                fmt_dims(&dims)
            ),
        };
        let input = [1, channels, h, w];
        let typed = model
            .with_input_fact(0, f32::fact(input).into())
            .and_then(|m| m.into_optimized())
            .map_err(|e| anyhow!("{p}: cannot prepare the model ({})", one_line(&e)))?;
        let mut outputs = Vec::new();
        for i in 0..typed.outputs.len() {
            let fact = typed
                .output_fact(i)
                .map_err(|e| anyhow!("{p}: {}", one_line(&e)))?;
            let shape = fact
                .shape
                .as_concrete()
                .ok_or_else(|| anyhow!("{p}: output {i} has a symbolic shape {:?}", fact.shape))?;
            outputs.push(shape.to_vec());
        }
        let plan = tract_onnx::prelude::IntoRunnable::into_runnable(typed)
            .map_err(|e| anyhow!("{p}: cannot prepare the model ({})", one_line(&e)))?;
        Ok(Self {
            path: path.to_path_buf(),
            plan,
            input,
            outputs,
        })
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Input shape `[1, C, H, W]`.
    pub fn input_shape(&self) -> [usize; 4] {
        self.input
    }

    /// Output shapes, in the model's output order.
    pub fn output_shapes(&self) -> &[Vec<usize>] {
        &self.outputs
    }

    /// Runs one planar `C × H × W` input.
    ///
    /// # Errors
    /// When `input` has the wrong length or inference fails (naming the file).
    pub fn run(&self, input: &[f32]) -> Result<Vec<Output>> {
        let p = self.path.display();
        let n: usize = self.input.iter().product();
        if input.len() != n {
            bail!(
                "{p}: input has {} values, expected {:?} = {n}",
                input.len(),
                self.input
            );
        }
        let t =
            Tensor::from_shape(&self.input, input).map_err(|e| anyhow!("{p}: {}", one_line(&e)))?;
        let out = self
            .plan
            .run(std::iter::once(t.into_tvalue()).collect())
            .map_err(|e| anyhow!("{p}: inference failed ({})", one_line(&e)))?;
        out.iter()
            .map(|v| {
                let view = v
                    .to_plain_array_view::<f32>()
                    .map_err(|e| anyhow!("{p}: output is not f32 ({})", one_line(&e)))?;
                Ok(Output {
                    shape: v.shape().to_vec(),
                    data: view.iter().copied().collect(),
                })
            })
            .collect()
    }
}
