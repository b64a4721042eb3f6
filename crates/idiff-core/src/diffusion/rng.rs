//! The seed contract (version 1): every random draw of an image comes from a ChaCha20
//! stream keyed by (seed, identity index, sample index, purpose), so an image is the same
//! whether it is generated alone, in a batch of 64, or in another shard.
//!
//! Stream key = SHA-256 of `"idiff-studio/seed-contract/v1"`, the seed, identity and sample
//! (little-endian u64 each) and the purpose name. Purposes:
//! - `noise`: x_T (latent-sized standard normals), then one latent-sized draw per
//!   stochastic step in sampling order;
//! - `context-dropout`: one uniform per projected-context element, drawn once per image and
//!   held for the whole trajectory (element kept when u ≥ p, then scaled by 1/(1−p)).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::StandardNormal;
use sha2::{Digest, Sha256};

/// Version of the seed contract written into manifests.
pub const SEED_CONTRACT_VERSION: u32 = 1;

/// Identifies one generated image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ImageKey {
    /// Global identity index.
    pub identity: u64,
    /// Sample index within the identity.
    pub sample: u64,
}

/// The ChaCha20 stream for one (seed, image, purpose).
pub fn stream(seed: u64, key: ImageKey, purpose: &str) -> ChaCha20Rng {
    let mut h = Sha256::new();
    h.update(b"idiff-studio/seed-contract/v1");
    h.update(seed.to_le_bytes());
    h.update(key.identity.to_le_bytes());
    h.update(key.sample.to_le_bytes());
    h.update(purpose.as_bytes());
    ChaCha20Rng::from_seed(h.finalize().into())
}

/// `n` standard normal f32 draws.
pub fn normals(rng: &mut ChaCha20Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

/// Inverted-dropout mask of `n` elements: 0 or 1/(1−p).
pub fn dropout_mask(rng: &mut ChaCha20Rng, n: usize, p: f64) -> Vec<f32> {
    let keep = (1.0 / (1.0 - p)) as f32;
    (0..n)
        .map(|_| if rng.random::<f64>() >= p { keep } else { 0.0 })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_differ_by_every_key_part_and_repeat_exactly() {
        let k = ImageKey {
            identity: 3,
            sample: 5,
        };
        let a = normals(&mut stream(1, k, "noise"), 8);
        assert_eq!(a, normals(&mut stream(1, k, "noise"), 8));
        assert_ne!(a, normals(&mut stream(2, k, "noise"), 8));
        assert_ne!(
            a,
            normals(
                &mut stream(
                    1,
                    ImageKey {
                        identity: 4,
                        sample: 5
                    },
                    "noise"
                ),
                8
            )
        );
        assert_ne!(
            a,
            normals(
                &mut stream(
                    1,
                    ImageKey {
                        identity: 3,
                        sample: 6
                    },
                    "noise"
                ),
                8
            )
        );
        assert_ne!(a, normals(&mut stream(1, k, "context-dropout"), 8));
    }

    #[test]
    fn dropout_mask_rate_and_scale() {
        let m = dropout_mask(
            &mut stream(
                0,
                ImageKey {
                    identity: 0,
                    sample: 0,
                },
                "d",
            ),
            100_000,
            0.25,
        );
        let dropped = m.iter().filter(|v| **v == 0.0).count() as f64 / m.len() as f64;
        assert!((dropped - 0.25).abs() < 0.01, "{dropped}");
        assert!(m.iter().all(|v| *v == 0.0 || (*v - 4.0 / 3.0).abs() < 1e-6));
        let none = dropout_mask(
            &mut stream(
                0,
                ImageKey {
                    identity: 0,
                    sample: 0,
                },
                "d",
            ),
            1000,
            0.0,
        );
        assert!(none.iter().all(|v| *v == 1.0));
    }
}
