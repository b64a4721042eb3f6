//! Numerically exact scoring: pyeer-style EER statistics, InsightFace verification and all-pairs score histograms.

pub mod bench_histogram;
pub mod commands;
pub mod embed;
pub mod font;
pub mod gpu;
pub mod histogram;
pub mod metrics;
pub mod output;
pub mod plots;
pub mod report;
pub mod verification;
