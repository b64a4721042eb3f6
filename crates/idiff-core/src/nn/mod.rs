//! The network layers the models are built from, one set for inference and training, and
//! the training ops behind them: convolution, transposed convolution, GroupNorm, BatchNorm,
//! PReLU, activations and attention with hand-written backward passes on the CPU's packed
//! kernels (see [`crate::kernels`]).

pub mod attention;
pub mod conv;
pub mod fused;
pub mod layers;
