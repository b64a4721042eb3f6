//! Face-recognition training on labelled face images: IResNet backbones with a
//! CosFace/ArcFace margin head, SGD with momentum, RandAugment, checkpoints that
//! `IResNet::load` reads, and InsightFace verification after every epoch.

pub mod augment;
pub mod ckpt;
pub mod config;
pub mod data;
pub mod eval;
pub mod loader;
pub mod margin;
pub mod optim;
pub mod schedule;

pub mod bench;
pub mod cli;
pub mod metrics;
pub mod net;
pub mod run;
pub mod trainer;
