//! Candle networks of the IDiff-Face pipeline, in the candle-transformers style.
pub mod unet;
pub mod vq;
pub mod iresnet;
pub mod config;
