//! IDiff Studio: a Rust re-implementation of IDiff-Face sampling, analysis, curation and
//! FR training, with a desktop studio on top.
//!
//! Data flows one way: settings → command → worker → events → state → view.

pub mod analysis;
pub mod app;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod dataset;
pub mod default_model;
pub mod diffusion;
pub mod files;
pub mod forward;
pub mod generate;
pub mod identity;
pub mod imageops;
pub mod kernels;
pub mod models;
pub mod nn;
pub mod onnx;
pub mod parity;
pub mod pipeline;
pub mod procface;
pub mod testutil;
pub mod train;
pub mod worker;
