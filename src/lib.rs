//! IDiff Studio: a Rust re-implementation of IDiff-Face sampling, analysis, curation and
//! FR training, with a desktop studio on top.
//!
//! Data flows one way: settings → command → worker → events → state → view.

pub mod analysis;
pub mod checkpoint;
pub mod dataset;
pub mod models;
pub mod testutil;
pub mod diffusion;
pub mod identity;
pub mod bench;
pub mod cli;
pub mod forward;
pub mod generate;
pub mod parity;
pub mod pipeline;
pub mod train;
pub mod worker;
pub mod app;
pub mod procface;
pub mod default_model;
