//! InsightFace verification `.bin` files (LFW, AgeDB-30, CFP-FP, CA-LFW, CP-LFW, …).
//!
//! A `.bin` is a pickle of `(bins, issame)`: `bins` holds `2N` encoded (JPEG/PNG) aligned
//! 112×112 face images, pair `k` being images `2k` and `2k + 1`; `issame[k]` says whether
//! the pair shows one identity. Files written by Python 2 store the images as `str`
//! (BINSTRING opcodes), Python 3 as `bytes` (BINBYTES, or `_codecs.encode(..., 'latin1')`
//! under protocol 2). `issame` may be a list of bools (or numpy bool scalars) or a numpy
//! bool array. Files written here use pickle protocol 3 with `bytes` and a list of bools.

use super::{encode_image, ImageEncoding};
use crate::files::write_atomic;
use crate::imageops::decode_rgb;
use anyhow::{anyhow, bail, ensure, Context, Result};
use image::RgbImage;
use serde_pickle::{DeOptions, SerOptions, Value};
use std::path::Path;

/// Side length of the aligned faces in verification files.
pub const VERIFICATION_IMAGE_SIZE: u32 = 112;

/// The contents of a verification `.bin`: encoded images and per-pair labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerificationPairs {
    /// `2N` encoded images; pair `k` is images `2k` and `2k + 1`.
    pub encoded: Vec<Vec<u8>>,
    /// `N` flags: true when pair `k` shows the same identity.
    pub issame: Vec<bool>,
}

impl VerificationPairs {
    /// Reads and checks a `.bin` file (images stay encoded; see [`Self::decode_all`]).
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read verification file {}", path.display()))?;
        Self::from_bytes(&bytes).map_err(|e| anyhow!("verification file {}: {e:#}", path.display()))
    }

    /// Parses the pickled `(bins, issame)` tuple.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let options = DeOptions::new()
            .keep_restore_state()
            .replace_unresolved_globals();
        let value = serde_pickle::value_from_slice(bytes, options)
            .map_err(|e| anyhow!("not a readable pickle (truncated or corrupt?): {e}"))?;
        let (bins, issame) = match value {
            Value::Tuple(mut items) | Value::List(mut items) if items.len() == 2 => {
                let issame = items.pop().unwrap_or(Value::None);
                (items.pop().unwrap_or(Value::None), issame)
            }
            other => bail!(
                "pickle holds {}, expected a (bins, issame) pair",
                kind(&other)
            ),
        };
        let pairs = Self {
            encoded: parse_bins(bins)?,
            issame: parse_issame(issame)?,
        };
        pairs.check()?;
        Ok(pairs)
    }

    /// Encodes 112×112 images (pair `k` = images `2k`, `2k + 1`) for writing.
    pub fn from_images(
        images: &[RgbImage],
        issame: Vec<bool>,
        encoding: ImageEncoding,
    ) -> Result<Self> {
        let size = VERIFICATION_IMAGE_SIZE;
        if let Some((i, img)) = images
            .iter()
            .enumerate()
            .find(|(_, im)| im.dimensions() != (size, size))
        {
            bail!(
                "image {i} is {}x{}, expected {size}x{size}",
                img.width(),
                img.height()
            );
        }
        let encoded = images
            .iter()
            .map(|img| encode_image(img, encoding))
            .collect::<Result<Vec<_>>>()?;
        let pairs = Self { encoded, issame };
        pairs.check()?;
        Ok(pairs)
    }

    fn check(&self) -> Result<()> {
        ensure!(
            self.encoded.len() == 2 * self.issame.len(),
            "{} images for {} pairs; expected exactly two images per pair",
            self.encoded.len(),
            self.issame.len()
        );
        Ok(())
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.issame.len()
    }

    /// True when there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.issame.is_empty()
    }

    /// Decodes image `i` into a 112×112 RGB (HWC) image.
    pub fn decode_image(&self, i: usize) -> Result<RgbImage> {
        let bytes = self
            .encoded
            .get(i)
            .ok_or_else(|| anyhow!("image {i} out of range ({} images)", self.encoded.len()))?;
        let img = decode_rgb(bytes).with_context(|| format!("image {i}"))?;
        let size = VERIFICATION_IMAGE_SIZE;
        ensure!(
            img.dimensions() == (size, size),
            "image {i} is {}x{}, expected {size}x{size}",
            img.width(),
            img.height()
        );
        Ok(img)
    }

    /// Decodes all `2N` images in order.
    pub fn decode_all(&self) -> Result<Vec<RgbImage>> {
        (0..self.encoded.len())
            .map(|i| self.decode_image(i))
            .collect()
    }

    /// The pickle bytes (protocol 3: `(list of bytes, list of bool)`).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let bins = self.encoded.iter().cloned().map(Value::Bytes).collect();
        let issame = self.issame.iter().copied().map(Value::Bool).collect();
        let value = Value::Tuple(vec![Value::List(bins), Value::List(issame)]);
        serde_pickle::value_to_vec(&value, SerOptions::new())
            .map_err(|e| anyhow!("cannot pickle verification pairs: {e}"))
    }

    /// Writes the `.bin` file atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.to_bytes()
            .and_then(|bytes| write_atomic(path, &bytes))
            .with_context(|| format!("cannot write verification file {}", path.display()))
    }
}

/// Reads a `.bin` and decodes it: `2N` RGB 112×112 images and `N` same-identity flags.
pub fn load_verification_bin(path: impl AsRef<Path>) -> Result<(Vec<RgbImage>, Vec<bool>)> {
    let path = path.as_ref();
    let pairs = VerificationPairs::read(path)?;
    let images = pairs
        .decode_all()
        .map_err(|e| anyhow!("verification file {}: {e:#}", path.display()))?;
    Ok((images, pairs.issame))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "a bool",
        Value::I64(_) | Value::Int(_) => "an int",
        Value::F64(_) => "a float",
        Value::Bytes(_) => "bytes",
        Value::String(_) => "a str",
        Value::List(_) => "a list",
        Value::Tuple(_) => "a tuple",
        Value::Set(_) | Value::FrozenSet(_) => "a set",
        Value::Dict(_) => "a dict",
    }
}

fn parse_bins(bins: Value) -> Result<Vec<Vec<u8>>> {
    let items = match bins {
        Value::List(items) | Value::Tuple(items) => items,
        other => bail!(
            "bins is {}, expected a list of encoded images",
            kind(&other)
        ),
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::Bytes(b) => Ok(b),
            other => bail!(
                "bins[{i}] is {}, expected encoded image bytes",
                kind(&other)
            ),
        })
        .collect()
}

fn parse_issame(issame: Value) -> Result<Vec<bool>> {
    match issame {
        Value::List(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| issame_flag(v).with_context(|| format!("issame[{i}]")))
            .collect(),
        Value::Tuple(state) => numpy_bool_array(state),
        other => bail!(
            "issame is {}, expected a list of bools or a numpy bool array",
            kind(&other)
        ),
    }
}

/// A Python bool/int, or a numpy bool scalar (kept as `(dtype, raw byte)`).
fn issame_flag(v: Value) -> Result<bool> {
    match v {
        Value::Bool(b) => Ok(b),
        Value::I64(i) if i == 0 || i == 1 => Ok(i == 1),
        Value::Tuple(t) => match t.last() {
            Some(Value::Bytes(raw)) if raw.len() == 1 => Ok(raw[0] != 0),
            _ => bail!("is a tuple/object, expected a bool"),
        },
        other => bail!("is {}, expected a bool", kind(&other)),
    }
}

/// A numpy array as the pickle leaves it: the `__setstate__` state
/// `(version, shape, dtype, fortran, raw)` (protocols 0–4), or the `_frombuffer` arguments
/// `(raw, dtype, shape, order)` (protocol 5). Only one-byte elements (bool/uint8) are
/// accepted.
fn numpy_bool_array(state: Vec<Value>) -> Result<Vec<bool>> {
    let not_array = || anyhow!("issame is a tuple but not a numpy array");
    let (raw, shape) = match state.as_slice() {
        [Value::Bytes(raw), _, shape @ Value::Tuple(_), _] => (raw, shape),
        [.., shape, _, _, Value::Bytes(raw)] if state.len() <= 5 => (raw, shape),
        _ => return Err(not_array()),
    };
    let count = match shape {
        Value::Tuple(dims) => dims.iter().try_fold(1usize, |n, d| match d {
            Value::I64(v) if *v >= 0 => n.checked_mul(*v as usize),
            _ => None,
        }),
        _ => None,
    }
    .ok_or_else(not_array)?;
    ensure!(
        raw.len() == count,
        "issame is a numpy array of {count} elements with {} data bytes; only bool arrays are supported",
        raw.len()
    );
    Ok(raw.iter().map(|&b| b != 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected() -> Option<(Vec<u8>, Vec<u8>)> {
        let path = crate::testutil::fixture("tiny_pairs_bin_expected.safetensors")?;
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let images = st.tensor("images_hwc_rgb").unwrap();
        assert_eq!(images.shape(), &[12, 112, 112, 3]);
        let issame = st.tensor("issame").unwrap();
        assert_eq!(issame.shape(), &[6]);
        Some((images.data().to_vec(), issame.data().to_vec()))
    }

    #[test]
    fn fixture_decodes_to_expected_pixels_and_issame() {
        let (Some(path), Some((exp_images, exp_issame))) =
            (crate::testutil::fixture("tiny_pairs.bin"), expected())
        else {
            return;
        };
        let (images, issame) = load_verification_bin(&path).unwrap();
        assert_eq!(images.len(), 12);
        let flags: Vec<u8> = issame.iter().map(|&b| u8::from(b)).collect();
        assert_eq!(flags, exp_issame);
        let pixels: Vec<u8> = images
            .iter()
            .flat_map(|im| im.as_raw().iter().copied())
            .collect();
        assert_eq!(pixels.len(), exp_images.len());
        let max_diff = pixels
            .iter()
            .zip(&exp_images)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(0);
        assert_eq!(max_diff, 0, "decoded pixels differ from the fixture");
    }

    fn face(seed: u8) -> RgbImage {
        RgbImage::from_fn(112, 112, |x, y| {
            image::Rgb([
                (x as u8).wrapping_mul(3).wrapping_add(seed),
                (y as u8).wrapping_mul(5) ^ seed,
                ((x * y) as u8).wrapping_add(seed),
            ])
        })
    }

    #[test]
    fn png_roundtrip_is_exact() {
        let images: Vec<RgbImage> = (0..6).map(|i| face(i * 37)).collect();
        let issame = vec![true, false, true];
        let pairs =
            VerificationPairs::from_images(&images, issame.clone(), ImageEncoding::Png).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pairs.bin");
        pairs.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..2], &[0x80, 3], "protocol 3 pickle");
        let (back, back_same) = load_verification_bin(&path).unwrap();
        assert_eq!(back_same, issame);
        assert!(back == images, "round-tripped pixels differ");
        assert_eq!(VerificationPairs::read(&path).unwrap(), pairs);
    }

    #[test]
    fn writer_checks_counts_and_sizes() {
        let images: Vec<RgbImage> = (0..3).map(face).collect();
        assert!(VerificationPairs::from_images(&images, vec![true], ImageEncoding::Png).is_err());
        let small = vec![RgbImage::new(100, 112), RgbImage::new(112, 112)];
        let err =
            VerificationPairs::from_images(&small, vec![true], ImageEncoding::Png).unwrap_err();
        assert!(err.to_string().contains("100x112"), "{err}");
    }

    fn short_binstring(out: &mut Vec<u8>, b: &[u8]) {
        out.push(b'U');
        out.push(b.len() as u8);
        out.extend(b);
    }

    /// Python-2 style protocol-2 pickle: images as `str` (SHORT_BINSTRING/BINSTRING).
    fn py2_pickle(bins: &[Vec<u8>], issame_tail: &[u8]) -> Vec<u8> {
        let mut out = vec![0x80, 2, b']', b'('];
        for b in bins {
            if b.len() < 256 {
                short_binstring(&mut out, b);
            } else {
                out.push(b'T');
                out.extend((b.len() as u32).to_le_bytes());
                out.extend(b);
            }
        }
        out.push(b'e');
        out.extend(issame_tail);
        out.extend([0x86, b'.']);
        out
    }

    #[test]
    fn python2_str_images_and_bool_list() {
        let images = [face(1), face(2)];
        let encoded: Vec<Vec<u8>> = images
            .iter()
            .map(|im| encode_image(im, ImageEncoding::Png).unwrap())
            .collect();
        let bytes = py2_pickle(&encoded, &[b']', b'(', 0x89, b'e']);
        let pairs = VerificationPairs::from_bytes(&bytes).unwrap();
        assert_eq!(pairs.encoded, encoded);
        assert_eq!(pairs.issame, vec![false]);
        assert!(pairs.decode_all().unwrap() == images);
    }

    #[test]
    fn numpy_bool_array_issame() {
        // numpy.core.multiarray._reconstruct(ndarray, (0,), 'b') + BUILD state, as pickled.
        let mut arr = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85".to_vec();
        short_binstring(&mut arr, b"b");
        arr.extend(b"\x87R(K\x01K\x03\x85cnumpy\ndtype\n");
        short_binstring(&mut arr, b"b1");
        arr.extend(b"K\x00K\x01\x87R(K\x03");
        short_binstring(&mut arr, b"|");
        arr.extend(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89");
        short_binstring(&mut arr, &[1, 0, 1]);
        arr.extend(b"tb");
        let bins = vec![vec![1u8, 2, 3]; 6];
        let pairs = VerificationPairs::from_bytes(&py2_pickle(&bins, &arr)).unwrap();
        assert_eq!(pairs.issame, vec![true, false, true]);
        assert_eq!(pairs.len(), 3);
        // Undecodable image bytes give an error naming the image.
        let err = pairs.decode_image(4).unwrap_err();
        assert!(format!("{err:#}").contains("image 4"), "{err:#}");
    }

    #[test]
    fn numpy_bool_array_issame_protocol_5() {
        // pickle.dumps(([b'\xff\xd8', b'\x01\x02', b'\x03', b'\x04'], numpy.array([False, True])),
        // protocol=5) from Python 3 / numpy 2.4: the array is
        // `_frombuffer(bytearray, dtype, shape, 'C')`.
        let bytes = b"\x80\x05\x95\x8e\x00\x00\x00\x00\x00\x00\x00]\x94(C\x02\xff\xd8\x94C\x02\
            \x01\x02\x94C\x01\x03\x94C\x01\x04\x94e\x8c\x13numpy._core.numeric\x94\x8c\x0b\
            _frombuffer\x94\x93\x94(\x96\x02\x00\x00\x00\x00\x00\x00\x00\x00\x01\x94\x8c\x05\
            numpy\x94\x8c\x05dtype\x94\x93\x94\x8c\x02b1\x94\x89\x88\x87\x94R\x94(K\x03\x8c\x01|\
            \x94NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t\x94bK\x02\x85\x94\x8c\x01C\x94t\x94R\
            \x94\x86\x94.";
        assert_eq!(bytes.len(), 153);
        let pairs = VerificationPairs::from_bytes(bytes).unwrap();
        assert_eq!(pairs.issame, vec![false, true]);
        assert_eq!(
            pairs.encoded,
            vec![vec![0xff, 0xd8], vec![1, 2], vec![3], vec![4]]
        );
    }

    #[test]
    fn truncated_and_malformed_files_give_clear_errors() {
        let pairs =
            VerificationPairs::from_images(&[face(3), face(4)], vec![true], ImageEncoding::Png)
                .unwrap();
        let bytes = pairs.to_bytes().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.bin");
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let msg = format!("{}", VerificationPairs::read(&path).unwrap_err());
        assert!(
            msg.contains("cut.bin") && msg.contains("truncated"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
        for cut in (0..bytes.len()).step_by(97) {
            assert!(
                VerificationPairs::from_bytes(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        // Three images for one pair.
        let odd = py2_pickle(&[vec![1], vec![2], vec![3]], &[b']', 0x88, b'a']);
        let msg = format!("{:#}", VerificationPairs::from_bytes(&odd).unwrap_err());
        assert!(msg.contains("3 images for 1 pairs"), "{msg}");
        let png = dir.path().join("img.bin");
        std::fs::write(&png, &pairs.encoded[0]).unwrap();
        assert!(VerificationPairs::read(&png).is_err());
        assert!(VerificationPairs::read(dir.path().join("missing.bin")).is_err());
    }
}
