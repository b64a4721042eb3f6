//! Diffusion: the linear noise schedule, the reference's ancestral DDPM sampler, DDIM,
//! classifier-free guidance, inference-time context dropout, and the seed contract.

pub mod checkpoint;
pub mod rng;
pub mod sampler;
pub mod schedule;
