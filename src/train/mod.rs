//! Face-recognition training on labelled face images (issue #6): IResNet backbones with a
//! CosFace/ArcFace margin head, SGD with momentum, RandAugment, checkpoints that
//! `IResNet::load` reads, and InsightFace verification after every epoch.

pub mod augment;
pub mod config;
pub mod data;
pub mod loader;
pub mod margin;
pub mod optim;
pub mod schedule;
pub mod ckpt;
pub mod eval;

pub mod conv;
pub mod fused;
pub mod net;
pub mod metrics;
pub mod trainer;
mod probe;
