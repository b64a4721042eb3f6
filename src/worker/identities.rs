//! The studio's identity list: named contexts with the seed-contract identity index
//! (`key`) that chooses their noise.

use crate::identity::{slerp, Contexts};
use anyhow::{ensure, Result};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// One identity of the list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityEntry {
    /// Display name.
    pub name: String,
    /// Where it came from, e.g. `seed 0 · #3`.
    pub origin: String,
    /// Seed-contract identity index (selects the noise of its images).
    pub key: u64,
    /// The context vector.
    #[serde(with = "f32_base64")]
    pub context: Arc<Vec<f32>>,
    /// A picture of who the identity is, shown before its grid row; `None` for identities
    /// without one (random, file, interpolated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Reference>,
}

/// A picture of who an identity is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reference {
    /// The frontal render of new ProcFace identity `index` (rendered when needed, a few
    /// milliseconds; sessions keep only the index).
    Procface(usize),
    /// A picture kept with the session as PNG: the face crop a photo identity came from.
    Picture(#[serde(with = "png_base64")] Arc<RgbImage>),
}

impl Reference {
    /// The picture (renders a ProcFace face: call off the UI thread or a few per frame).
    pub fn image(&self) -> Arc<RgbImage> {
        match self {
            Self::Procface(index) => {
                Arc::new(crate::default_model::eval::procface_reference(*index))
            }
            Self::Picture(image) => image.clone(),
        }
    }
}

/// `n` uniform random identities `first..first+n` from `seed`.
pub fn random_identities(
    seed: u64,
    first: usize,
    n: usize,
    dim: usize,
) -> Result<Vec<IdentityEntry>> {
    ensure!(n > 0, "choose at least one identity");
    let c = Contexts::uniform(seed, first, n, dim)?;
    Ok((0..n)
        .map(|i| {
            let k = first + i;
            IdentityEntry {
                name: format!("id {k}"),
                origin: format!("seed {seed} · #{k}"),
                key: k as u64,
                context: Arc::new(c.row(i).to_vec()),
                reference: None,
            }
        })
        .collect())
}

/// ProcFace identities `first..first + rows.len()` (seeds from 2,000,000 + `first`), keyed by
/// their index as `generate --procface-identities` does, each with its frontal render as
/// reference.
pub fn procface_identities(first: usize, rows: Vec<Vec<f32>>) -> Vec<IdentityEntry> {
    use crate::procface::seeds::procface_identity_seed;
    rows.into_iter()
        .enumerate()
        .map(|(i, row)| IdentityEntry {
            name: format!("ProcFace {}", procface_identity_seed(first + i)),
            origin: format!("ProcFace · #{}", first + i),
            key: (first + i) as u64,
            context: Arc::new(row),
            reference: Some(Reference::Procface(first + i)),
        })
        .collect()
}

/// Identities from the rows of a context file.
pub fn file_identities(
    file_label: &str,
    names: &[String],
    rows: Vec<Vec<f32>>,
) -> Vec<IdentityEntry> {
    rows.into_iter()
        .enumerate()
        .map(|(i, row)| IdentityEntry {
            name: names.get(i).cloned().unwrap_or_else(|| i.to_string()),
            origin: format!("{file_label} · row {i}"),
            key: i as u64,
            context: Arc::new(row),
            reference: None,
        })
        .collect()
}

/// `steps` identities on the great circle from `a` to `b` (both ends included). With
/// `shared_noise` they all use `a`'s key, so only the identity changes along a row.
pub fn interpolate(
    a: &IdentityEntry,
    b: &IdentityEntry,
    steps: usize,
    shared_noise: bool,
) -> Result<Vec<IdentityEntry>> {
    ensure!(steps >= 2, "interpolation needs at least 2 steps");
    (0..steps)
        .map(|i| {
            let t = i as f32 / (steps - 1) as f32;
            Ok(IdentityEntry {
                name: format!("{} to {} · t={t:.2}", a.name, b.name),
                origin: format!("slerp t={t:.2}"),
                key: if shared_noise {
                    a.key
                } else {
                    a.key.wrapping_add(i as u64)
                },
                context: Arc::new(slerp(&a.context, &b.context, t)?),
                reference: None,
            })
        })
        .collect()
}

/// Serialises a reference picture as base64 of its PNG.
mod png_base64 {
    use super::f32_base64::{decode, encode};
    use image::RgbImage;
    use serde::{Deserialize, Deserializer, Serializer};
    use std::sync::Arc;

    pub fn serialize<S: Serializer>(img: &Arc<RgbImage>, s: S) -> Result<S::Ok, S::Error> {
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .map_err(serde::ser::Error::custom)?;
        s.serialize_str(&encode(&png))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<RgbImage>, D::Error> {
        let png = decode(&String::deserialize(d)?).map_err(serde::de::Error::custom)?;
        let img = image::load_from_memory_with_format(&png, image::ImageFormat::Png)
            .map_err(|e| serde::de::Error::custom(format!("reference image: {e}")))?;
        Ok(Arc::new(img.to_rgb8()))
    }
}

/// Serialises `Vec<f32>` as base64 of little-endian bytes (compact session files).
mod f32_base64 {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::sync::Arc;

    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn serialize<S: Serializer>(v: &Arc<Vec<f32>>, s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        s.serialize_str(&encode(&bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<Vec<f32>>, D::Error> {
        let s = String::deserialize(d)?;
        let bytes = decode(&s).map_err(serde::de::Error::custom)?;
        if bytes.len() % 4 != 0 {
            return Err(serde::de::Error::custom(
                "context length is not a multiple of 4 bytes",
            ));
        }
        Ok(Arc::new(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ))
    }

    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    pub fn decode(s: &str) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(s.len() / 4 * 3);
        let mut acc = 0u32;
        let mut bits = 0;
        for c in s.bytes().filter(|c| *c != b'=') {
            let v = ALPHABET
                .iter()
                .position(|a| *a == c)
                .ok_or_else(|| format!("invalid base64 character {:?}", c as char))?
                as u32;
            acc = (acc << 6) | v;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        Ok(out)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trips_every_length() {
            for n in 0..10u8 {
                let bytes: Vec<u8> = (0..n).map(|i| i.wrapping_mul(97)).collect();
                assert_eq!(super::decode(&super::encode(&bytes)).unwrap(), bytes);
            }
            assert_eq!(super::encode(b"Man"), "TWFu");
            assert_eq!(super::encode(b"Ma"), "TWE=");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::default_model::eval::{procface_reference, REFERENCE_SIZE};

    #[test]
    fn random_identities_match_the_cli_and_serialise_exactly() {
        let ids = random_identities(7, 2, 3, 512).unwrap();
        assert_eq!(ids[1].key, 3);
        assert_eq!(*ids[1].context, crate::identity::uniform_context(7, 3, 512));
        let json = serde_json::to_string(&ids).unwrap();
        assert!(!json.contains("reference"), "{json}");
        let back: Vec<IdentityEntry> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ids);
    }

    /// The studio's ProcFace identities are the CLI's (`generate --procface-identities`):
    /// same keys (noise), same contexts (the FR centroid of two renders of seed 2,000,000 + k).
    #[test]
    fn procface_identities_match_the_cli() {
        use crate::generate::IdentitySource;
        let cli = IdentitySource::Procface { count: 3, first: 4 }
            .resolve(64)
            .unwrap();
        let rows = crate::default_model::eval::builtin_procface_contexts(4, 3).unwrap();
        let ids = procface_identities(4, rows);
        assert_eq!(ids.len(), 3);
        for (gui, cli) in ids.iter().zip(&cli) {
            assert_eq!(gui.key, cli.index as u64);
            assert_eq!(*gui.context, cli.context);
        }
        assert_eq!(ids[0].name, "ProcFace 2000004");
        // Each has its frontal render as reference; sessions keep only the index.
        assert_eq!(ids[1].reference, Some(Reference::Procface(5)));
        let picture = ids[1].reference.as_ref().unwrap().image();
        assert_eq!(picture.dimensions(), (REFERENCE_SIZE, REFERENCE_SIZE));
        assert_eq!(*picture, procface_reference(5));
        assert_ne!(*ids[0].reference.as_ref().unwrap().image(), *picture);
        let json = serde_json::to_string(&ids).unwrap();
        assert!(json.contains(r#""reference":{"procface":5}"#), "{json}");
        let back: Vec<IdentityEntry> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ids);
        assert_eq!(cli[2].name, "procface 2000006");
        // The same identity seed always gives the same context; different seeds differ.
        let again = crate::default_model::eval::builtin_procface_contexts(5, 1).unwrap();
        assert_eq!(again[0], *ids[1].context);
        assert_ne!(ids[0].context, ids[1].context);
        let err = IdentitySource::Procface { count: 1, first: 0 }
            .resolve(512)
            .unwrap_err()
            .to_string();
        assert!(err.contains("64-d") && err.contains("512-d"), "{err}");
    }

    /// A photo identity's face crop is kept with the session, exactly (PNG is lossless).
    #[test]
    fn picture_references_round_trip_and_a_corrupt_one_is_an_error() {
        let mut ids = random_identities(1, 0, 1, 8).unwrap();
        let crop = RgbImage::from_fn(112, 112, |x, y| image::Rgb([x as u8, y as u8, 7]));
        ids[0].reference = Some(Reference::Picture(Arc::new(crop.clone())));
        let json = serde_json::to_string(&ids).unwrap();
        let back: Vec<IdentityEntry> = serde_json::from_str(&json).unwrap();
        assert_eq!(*back[0].reference.as_ref().unwrap().image(), crop);
        let broken = json.replacen(r#""picture":""#, r#""picture":"AAAA"#, 1);
        let err = serde_json::from_str::<Vec<IdentityEntry>>(&broken).unwrap_err();
        assert!(err.to_string().contains("reference image"), "{err}");
    }

    #[test]
    fn interpolation_keeps_the_ends() {
        let ids = random_identities(1, 0, 2, 16).unwrap();
        let path = interpolate(&ids[0], &ids[1], 4, true).unwrap();
        assert_eq!(path.len(), 4);
        assert!(path.iter().all(|p| p.key == ids[0].key));
        let d: f32 = path[3]
            .context
            .iter()
            .zip(ids[1].context.iter())
            .map(|(a, b)| (a - b).abs())
            .sum();
        assert!(d < 1e-4, "{d}");
    }
}
