//! Candle networks of the IDiff-Face pipeline, in the candle-transformers style.
pub mod config;
pub mod iresnet;
pub mod unet;
pub mod vq;
