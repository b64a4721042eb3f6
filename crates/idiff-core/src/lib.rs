//! The numerical core of IDiff Studio: CPU kernels (packed GEMM, convolutions, attention),
//! the candle layers that use them for inference and training, the IDiff-Face models
//! (conditional U-Net, VQ-f4 autoencoder, IResNet), diffusion schedules and samplers, and
//! checkpoint loading. It knows no UI and no command line.

pub mod checkpoint;
pub mod diffusion;
pub mod errors;
pub mod files;
pub mod kernels;
pub mod models;
pub mod nn;
pub mod testutil;
