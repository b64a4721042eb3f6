//! MXNet/InsightFace RecordIO face datasets (`train.rec`, `train.idx`, `property`), as
//! arcface_torch's `MXFaceDataset` reads them.
//!
//! Layout:
//! - `train.rec`: records framed as `u32 magic 0xced7230a`, `u32 lrecord` (upper 3 bits:
//!   continuation flag, lower 29 bits: length), payload, zero padding to 4 bytes. A payload
//!   that contains the magic word at a 4-aligned offset is split there into parts (flags 1,
//!   2, 3), dropping the magic word, exactly as dmlc-core writes it.
//! - payload: IRHeader `u32 flag, f32 label, u64 id, u64 id2`, then `flag` extra f32
//!   labels when `flag > 0`, then the encoded JPEG/PNG image.
//! - record 0 is a header whose labels are `(first identity key, end identity key)`; the
//!   images are keys `1 .. first identity key`, each labelled with its identity index; the
//!   identity records that follow map identity `i` to its image key range `(start, end)`.
//! - `train.idx`: text lines `key\tbyte_offset`; `property`: `num_classes,height,width`.

use super::{encode_image, ImageEncoding};
use crate::files::{rename_into_place, temp_path};
use crate::imageops::decode_rgb;
use anyhow::{anyhow, bail, ensure, Context, Result};
use image::RgbImage;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Magic word starting every RecordIO record (part).
pub const RECORDIO_MAGIC: u32 = 0xced7_230a;
/// Size of the fixed IRHeader in bytes.
pub const IR_HEADER_LEN: usize = 24;
const LENGTH_MASK: u32 = (1 << 29) - 1;
/// Largest key or label stored exactly as an f32 label.
const MAX_EXACT_F32: u64 = 1 << 24;

/// The InsightFace image-record header (`mx.recordio.IRHeader`).
#[derive(Debug, Clone, PartialEq)]
pub struct IrHeader {
    /// Number of extra labels (0: the single `label` is used).
    pub flag: u32,
    /// Scalar label, meaningful when `flag == 0`.
    pub label: f32,
    /// Record id (the record's key in InsightFace packs).
    pub id: u64,
    /// Second id (0 in InsightFace packs).
    pub id2: u64,
    /// The `flag` extra labels.
    pub extra_labels: Vec<f32>,
}

impl IrHeader {
    /// Splits a record payload into its header and the bytes after it.
    pub fn parse(payload: &[u8]) -> Result<(Self, &[u8])> {
        ensure!(
            payload.len() >= IR_HEADER_LEN,
            "record payload has {} bytes, shorter than the 24-byte IRHeader",
            payload.len()
        );
        let u32_at = |o: usize| {
            u32::from_le_bytes([payload[o], payload[o + 1], payload[o + 2], payload[o + 3]])
        };
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        let flag = u32_at(0);
        let extra_end = IR_HEADER_LEN + 4 * flag as usize;
        ensure!(
            payload.len() >= extra_end,
            "record header announces {flag} extra labels but the payload has only {} bytes",
            payload.len()
        );
        let extra_labels = payload[IR_HEADER_LEN..extra_end]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let header = Self {
            flag,
            label: f32::from_bits(u32_at(4)),
            id: u64_at(8),
            id2: u64_at(16),
            extra_labels,
        };
        Ok((header, &payload[extra_end..]))
    }

    /// Appends the header (with its extra labels) to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend((self.extra_labels.len() as u32).to_le_bytes());
        out.extend(self.label.to_le_bytes());
        out.extend(self.id.to_le_bytes());
        out.extend(self.id2.to_le_bytes());
        out.extend(self.extra_labels.iter().flat_map(|v| v.to_le_bytes()));
    }

    /// The labels as MXNet reports them: the extra labels when `flag > 0`, else `[label]`.
    pub fn labels(&self) -> Vec<f32> {
        if self.flag > 0 {
            self.extra_labels.clone()
        } else {
            vec![self.label]
        }
    }

    /// Integer identity as arcface_torch derives it: the first label, truncated toward zero.
    pub fn identity(&self) -> Result<i64> {
        let label = self.labels().first().copied().unwrap_or(f32::NAN);
        ensure!(
            label.is_finite(),
            "record label {label} is not a finite number"
        );
        Ok(label as i64)
    }
}

/// Contents of a `property` file: `num_classes,height,width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Property {
    /// Number of identities.
    pub num_classes: usize,
    /// Image height in pixels.
    pub height: u32,
    /// Image width in pixels.
    pub width: u32,
}

impl Property {
    /// Parses `num_classes,height,width` (surrounding whitespace allowed).
    pub fn parse(text: &str) -> Result<Self> {
        let fields: Vec<&str> = text.trim().split(',').map(str::trim).collect();
        let [c, h, w] = fields.as_slice() else {
            bail!(
                "property '{}' is not 'num_classes,height,width'",
                text.trim()
            );
        };
        let bad = || anyhow!("property '{}' holds a non-integer field", text.trim());
        Ok(Self {
            num_classes: c.parse().map_err(|_| bad())?,
            height: h.parse().map_err(|_| bad())?,
            width: w.parse().map_err(|_| bad())?,
        })
    }

    /// Reads and parses a `property` file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read property file {}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
    }

    /// The file text, `num_classes,height,width` plus a newline.
    pub fn to_text(&self) -> String {
        format!("{},{},{}\n", self.num_classes, self.height, self.width)
    }
}

/// Summary of the image labels of a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelCheck {
    /// Number of image records.
    pub num_images: usize,
    /// Number of distinct integer labels.
    pub num_distinct: usize,
    /// Smallest label (0 when there are no images).
    pub min: i64,
    /// Largest label (0 when there are no images).
    pub max: i64,
    /// Set when all of several images carry the same label (the DCFace packing bug).
    pub warning: Option<String>,
}

/// Random-access reader of a RecordIO face dataset.
#[derive(Debug)]
pub struct RecordReader {
    rec_path: PathBuf,
    file: Mutex<File>,
    file_len: u64,
    offsets: HashMap<u64, u64>,
    image_keys: Vec<u64>,
    header: Option<IrHeader>,
}

impl RecordReader {
    /// Opens `dir/train.rec` with `dir/train.idx`.
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        Self::open(dir.join("train.rec"), dir.join("train.idx"))
    }

    /// Opens a `.rec` file with its `.idx` index and reads header record 0.
    ///
    /// When record 0 carries labels (flag > 0) the images are keys `1 .. label[0]`, as in
    /// arcface_torch; otherwise every key of the index is an image.
    pub fn open(rec: impl AsRef<Path>, idx: impl AsRef<Path>) -> Result<Self> {
        let (rec, idx) = (rec.as_ref(), idx.as_ref());
        let (keys, offsets) = read_index(idx)?;
        let file = File::open(rec).with_context(|| format!("cannot open {}", rec.display()))?;
        let file_len = file
            .metadata()
            .with_context(|| format!("cannot stat {}", rec.display()))?
            .len();
        let mut reader = Self {
            rec_path: rec.to_path_buf(),
            file: Mutex::new(file),
            file_len,
            offsets,
            image_keys: Vec::new(),
            header: None,
        };
        let (header, _) = reader.read_record(0)?;
        if header.flag > 0 {
            let end = header.labels()[0];
            ensure!(
                end.is_finite() && end >= 1.0,
                "{}: header record 0 has invalid first identity key {end}",
                rec.display()
            );
            let image_keys: Vec<u64> = (1..end as u64).collect();
            if let Some(k) = image_keys.iter().find(|k| !reader.offsets.contains_key(k)) {
                bail!(
                    "{}: image key {k} is missing from {}",
                    rec.display(),
                    idx.display()
                );
            }
            reader.image_keys = image_keys;
            reader.header = Some(header);
        } else {
            reader.image_keys = keys;
        }
        Ok(reader)
    }

    /// Header record 0, when it carries the identity-range labels.
    pub fn header(&self) -> Option<&IrHeader> {
        self.header.as_ref()
    }

    /// Keys of the image records, in dataset order.
    pub fn image_keys(&self) -> &[u64] {
        &self.image_keys
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.image_keys.len()
    }

    /// True when the dataset has no images.
    pub fn is_empty(&self) -> bool {
        self.image_keys.is_empty()
    }

    /// Reads record `key`: its header and the bytes after the header (the encoded image).
    pub fn read_record(&self, key: u64) -> Result<(IrHeader, Vec<u8>)> {
        let offset = *self
            .offsets
            .get(&key)
            .ok_or_else(|| anyhow!("{}: key {key} is not in the index", self.rec_path.display()))?;
        let payload = self.read_payload(offset).map_err(|e| {
            anyhow!(
                "{} key {key} (offset {offset}): {e:#}",
                self.rec_path.display()
            )
        })?;
        let (header, rest) = IrHeader::parse(&payload)
            .map_err(|e| anyhow!("{} key {key}: {e}", self.rec_path.display()))?;
        Ok((header, rest.to_vec()))
    }

    /// Decodes image record `key` into an RGB HWC image and its integer identity.
    pub fn read_image(&self, key: u64) -> Result<(RgbImage, i64)> {
        let (header, data) = self.read_record(key)?;
        let context = || format!("{} key {key}", self.rec_path.display());
        let label = header.identity().with_context(context)?;
        let img = decode_rgb(&data).map_err(|e| anyhow!("{}: {e}", context()))?;
        Ok((img, label))
    }

    /// The `i`-th image of the dataset (see [`RecordReader::image_keys`]).
    pub fn get(&self, i: usize) -> Result<(RgbImage, i64)> {
        let key = *self.image_keys.get(i).ok_or_else(|| {
            anyhow!(
                "{}: image {i} out of range ({} images)",
                self.rec_path.display(),
                self.len()
            )
        })?;
        self.read_image(key)
    }

    /// Integer identities of all images, in dataset order (reads only record headers).
    pub fn labels(&self) -> Result<Vec<i64>> {
        self.image_keys
            .iter()
            .map(|&key| {
                let header = self.read_header_only(key)?;
                header
                    .identity()
                    .map_err(|e| anyhow!("{} key {key}: {e}", self.rec_path.display()))
            })
            .collect()
    }

    /// Identity ranges `(start key, end key)` from the identity records, indexed by identity.
    /// Empty when record 0 carries no ranges.
    pub fn identity_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let Some(header) = &self.header else {
            return Ok(Vec::new());
        };
        let labels = header.labels();
        let (first, end) = match labels.as_slice() {
            [a, b, ..] if *a <= *b => (*a as u64, *b as u64),
            _ => bail!(
                "{}: header record has no identity range",
                self.rec_path.display()
            ),
        };
        (first..end)
            .map(|key| {
                let h = self.read_header_only(key)?;
                match h.labels().as_slice() {
                    [s, e, ..] => Ok((*s as u64, *e as u64)),
                    _ => bail!(
                        "{} key {key}: not an identity record",
                        self.rec_path.display()
                    ),
                }
            })
            .collect()
    }

    /// Checks the image labels; warns (log and [`LabelCheck::warning`]) when every image
    /// carries the same label, the DCFace packing bug that makes FR training meaningless.
    pub fn check_labels(&self) -> Result<LabelCheck> {
        let labels = self.labels()?;
        let distinct: BTreeSet<i64> = labels.iter().copied().collect();
        let min = distinct.first().copied().unwrap_or(0);
        let max = distinct.last().copied().unwrap_or(0);
        let warning = (labels.len() > 1 && distinct.len() == 1).then(|| {
            format!(
                "all {} images in {} carry the same label {min} (the DCFace packing bug); \
                 identities cannot be learned from this file",
                labels.len(),
                self.rec_path.display()
            )
        });
        if let Some(w) = &warning {
            tracing::warn!("{w}");
        }
        Ok(LabelCheck {
            num_images: labels.len(),
            num_distinct: distinct.len(),
            min,
            max,
            warning,
        })
    }

    fn read_header_only(&self, key: u64) -> Result<IrHeader> {
        Ok(self.read_record(key)?.0)
    }

    /// Reads the (possibly multi-part) record payload starting at `offset`.
    fn read_payload(&self, offset: u64) -> Result<Vec<u8>> {
        let mut file = self
            .file
            .lock()
            .map_err(|_| anyhow!("record file lock poisoned"))?;
        let mut pos = offset;
        let mut payload = Vec::new();
        let mut part = 0;
        loop {
            let (cflag, len) = self.read_part(&mut file, pos, &mut payload)?;
            pos += 8 + u64::from(len.div_ceil(4) * 4);
            match (part, cflag) {
                (0, 0) => return Ok(payload),
                (_, 3) if part > 0 => return Ok(payload),
                (0, 1) | (1.., 2) => payload.extend(RECORDIO_MAGIC.to_le_bytes()),
                _ => bail!("record part {part} has unexpected continuation flag {cflag}"),
            }
            part += 1;
        }
    }

    /// Reads one record part at `pos`, appending its data to `out`; returns (cflag, length).
    fn read_part(&self, file: &mut File, pos: u64, out: &mut Vec<u8>) -> Result<(u32, u32)> {
        ensure!(
            pos + 8 <= self.file_len,
            "record header at {pos} lies beyond the end of the file ({} bytes): truncated?",
            self.file_len
        );
        let mut head = [0u8; 8];
        file.seek(SeekFrom::Start(pos))?;
        file.read_exact(&mut head)?;
        let magic = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        ensure!(
            magic == RECORDIO_MAGIC,
            "bad record magic 0x{magic:08x} at byte {pos} (expected 0x{RECORDIO_MAGIC:08x})"
        );
        let lrec = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let (cflag, len) = (lrec >> 29, lrec & LENGTH_MASK);
        ensure!(
            pos + 8 + u64::from(len) <= self.file_len,
            "record at {pos} needs {len} bytes but the file ends at {}: truncated",
            self.file_len
        );
        let start = out.len();
        out.resize(start + len as usize, 0);
        file.read_exact(&mut out[start..])?;
        Ok((cflag, len))
    }
}

/// Reads `key\toffset` lines; returns the keys in file order and the key → offset map.
fn read_index(idx: &Path) -> Result<(Vec<u64>, HashMap<u64, u64>)> {
    let text = std::fs::read_to_string(idx)
        .with_context(|| format!("cannot read index {}", idx.display()))?;
    let mut keys = Vec::new();
    let mut offsets = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut fields = line.split_whitespace();
        let parsed = match (fields.next(), fields.next(), fields.next()) {
            (Some(k), Some(o), None) => k.parse::<u64>().ok().zip(o.parse::<u64>().ok()),
            _ => None,
        };
        let (key, offset) = parsed.ok_or_else(|| {
            anyhow!(
                "{} line {}: expected 'key<TAB>offset', got '{line}'",
                idx.display(),
                n + 1
            )
        })?;
        ensure!(
            offsets.insert(key, offset).is_none(),
            "{} line {}: key {key} appears twice",
            idx.display(),
            n + 1
        );
        keys.push(key);
    }
    ensure!(!keys.is_empty(), "{} lists no records", idx.display());
    Ok((keys, offsets))
}

/// Frames `payload` as one record (split at aligned magic words like dmlc-core) into `out`.
fn frame_record(payload: &[u8], out: &mut Vec<u8>) -> Result<()> {
    ensure!(
        payload.len() <= LENGTH_MASK as usize,
        "record of {} bytes exceeds the RecordIO limit of 2^29 - 1",
        payload.len()
    );
    let magic = RECORDIO_MAGIC.to_le_bytes();
    let mut start = 0;
    for i in (0..payload.len() / 4 * 4).step_by(4) {
        if payload[i..i + 4] == magic {
            let cflag = if start == 0 { 1 } else { 2 };
            push_part(out, cflag, &payload[start..i]);
            start = i + 4;
        }
    }
    push_part(out, if start == 0 { 0 } else { 3 }, &payload[start..]);
    Ok(())
}

fn push_part(out: &mut Vec<u8>, cflag: u32, data: &[u8]) {
    out.extend(RECORDIO_MAGIC.to_le_bytes());
    out.extend(((cflag << 29) | data.len() as u32).to_le_bytes());
    out.extend(data);
    out.resize(out.len() + (4 - data.len() % 4) % 4, 0);
}

/// Counts of a finished dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteSummary {
    /// Number of image records written.
    pub num_images: usize,
    /// Number of identities (largest label + 1).
    pub num_classes: usize,
}

/// Streaming writer of an InsightFace-style RecordIO dataset.
///
/// Images must arrive grouped by identity with non-decreasing labels. Everything is written
/// to temporary files that [`RecordWriter::finish`] renames into place; dropping the writer
/// unfinished removes them.
#[derive(Debug)]
pub struct RecordWriter {
    paths: [PathBuf; 3],
    temps: [PathBuf; 3],
    out: Option<BufWriter<File>>,
    pos: u64,
    index: Vec<(u64, u64)>,
    ranges: Vec<(u64, u64)>,
    image_size: (u32, u32),
    finished: bool,
}

impl RecordWriter {
    /// Creates `dir/train.rec`, `dir/train.idx` and `dir/property` for images of
    /// `height × width` pixels.
    pub fn create_dir(dir: impl AsRef<Path>, height: u32, width: u32) -> Result<Self> {
        let dir = dir.as_ref();
        Self::create(
            dir.join("train.rec"),
            dir.join("train.idx"),
            dir.join("property"),
            height,
            width,
        )
    }

    /// Creates a dataset at explicit `.rec`, `.idx` and `property` paths.
    pub fn create(
        rec: impl AsRef<Path>,
        idx: impl AsRef<Path>,
        property: impl AsRef<Path>,
        height: u32,
        width: u32,
    ) -> Result<Self> {
        let paths = [
            rec.as_ref().to_path_buf(),
            idx.as_ref().to_path_buf(),
            property.as_ref().to_path_buf(),
        ];
        let temps = [
            temp_path(&paths[0])?,
            temp_path(&paths[1])?,
            temp_path(&paths[2])?,
        ];
        let file = File::create(&temps[0])
            .with_context(|| format!("cannot create {}", temps[0].display()))?;
        let mut writer = Self {
            paths,
            temps,
            out: Some(BufWriter::new(file)),
            pos: 0,
            index: Vec::new(),
            ranges: Vec::new(),
            image_size: (height, width),
            finished: false,
        };
        // Placeholder header; rewritten in place (same length) by `finish`.
        writer.write_record(0, &header_record(0, 0))?;
        Ok(writer)
    }

    /// Number of images written so far.
    pub fn num_images(&self) -> usize {
        self.index.len().saturating_sub(1)
    }

    /// Appends an already encoded JPEG/PNG image with identity `label`; returns its key.
    /// The bytes are stored as given (their size is not checked).
    pub fn push_encoded(&mut self, encoded: &[u8], label: usize) -> Result<u64> {
        let key = self.index.len() as u64;
        ensure!(
            key < MAX_EXACT_F32 && (label as u64) < MAX_EXACT_F32,
            "key {key} or label {label} is too large for an exact f32 label"
        );
        match self.ranges.len() {
            n if label + 1 < n => bail!(
                "labels must be grouped by identity in non-decreasing order: got {label} after {}",
                n - 1
            ),
            n => {
                // Identities skipped over get empty ranges.
                self.ranges.extend((n..=label).map(|_| (key, key)));
            }
        }
        self.ranges[label].1 = key + 1;
        let header = IrHeader {
            flag: 0,
            label: label as f32,
            id: key,
            id2: 0,
            extra_labels: Vec::new(),
        };
        let mut payload = Vec::with_capacity(IR_HEADER_LEN + encoded.len());
        header.write(&mut payload);
        payload.extend(encoded);
        self.write_record(key, &payload)?;
        Ok(key)
    }

    /// Encodes `img` (which must match the dataset's image size) and appends it.
    pub fn push_image(
        &mut self,
        img: &RgbImage,
        label: usize,
        encoding: ImageEncoding,
    ) -> Result<u64> {
        let (h, w) = self.image_size;
        ensure!(
            img.dimensions() == (w, h),
            "image is {}x{} (w×h) but the dataset holds {w}x{h}",
            img.width(),
            img.height()
        );
        self.push_encoded(&encode_image(img, encoding)?, label)
    }

    /// Writes the identity records, the final header, `.idx` and `property`, then renames
    /// the three files into place.
    pub fn finish(mut self) -> Result<WriteSummary> {
        let num_images = self.num_images();
        let num_classes = self.ranges.len();
        let first_identity_key = num_images as u64 + 1;
        for (i, &(start, end)) in self.ranges.clone().iter().enumerate() {
            let key = first_identity_key + i as u64;
            ensure!(
                key < MAX_EXACT_F32,
                "key {key} is too large for an exact f32 label"
            );
            self.write_record(key, &identity_record(key, start, end))?;
        }
        let header = header_record(first_identity_key, first_identity_key + num_classes as u64);
        let rec_tmp = self.temps[0].clone();
        let mut file = self
            .out
            .take()
            .ok_or_else(|| anyhow!("writer already finished"))?
            .into_inner()
            .map_err(|e| anyhow!("cannot write {}: {}", rec_tmp.display(), e.error()))?;
        file.seek(SeekFrom::Start(8))
            .and_then(|_| file.write_all(&header))
            .and_then(|_| file.sync_all())
            .with_context(|| format!("cannot write {}", rec_tmp.display()))?;
        drop(file);
        let idx_text: String = self
            .index
            .iter()
            .map(|(k, o)| format!("{k}\t{o}\n"))
            .collect();
        let property = Property {
            num_classes,
            height: self.image_size.0,
            width: self.image_size.1,
        };
        std::fs::write(&self.temps[1], idx_text)
            .with_context(|| format!("cannot write {}", self.temps[1].display()))?;
        std::fs::write(&self.temps[2], property.to_text())
            .with_context(|| format!("cannot write {}", self.temps[2].display()))?;
        for (tmp, path) in self.temps.iter().zip(&self.paths) {
            rename_into_place(tmp, path)?;
        }
        self.finished = true;
        Ok(WriteSummary {
            num_images,
            num_classes,
        })
    }

    fn write_record(&mut self, key: u64, payload: &[u8]) -> Result<()> {
        let mut framed = Vec::with_capacity(payload.len() + 16);
        frame_record(payload, &mut framed)?;
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| anyhow!("writer already finished"))?;
        out.write_all(&framed)
            .with_context(|| format!("cannot write {}", self.temps[0].display()))?;
        self.index.push((key, self.pos));
        self.pos += framed.len() as u64;
        Ok(())
    }
}

impl Drop for RecordWriter {
    fn drop(&mut self) {
        if !self.finished {
            self.out = None;
            for tmp in &self.temps {
                let _ = std::fs::remove_file(tmp);
            }
        }
    }
}

fn ranged_record(key: u64, start: u64, end: u64) -> Vec<u8> {
    let mut payload = Vec::with_capacity(IR_HEADER_LEN + 8);
    IrHeader {
        flag: 2,
        label: 0.0,
        id: key,
        id2: 0,
        extra_labels: vec![start as f32, end as f32],
    }
    .write(&mut payload);
    payload
}

/// Record 0: labels `(first identity key, end identity key)`, id 0.
fn header_record(first_identity_key: u64, end_key: u64) -> Vec<u8> {
    ranged_record(0, first_identity_key, end_key)
}

/// Identity record `key`: labels `(first image key, end image key)` of one identity.
fn identity_record(key: u64, start: u64, end: u64) -> Vec<u8> {
    ranged_record(key, start, end)
}

/// Writes `items` (image, identity) as a dataset in `dir`, stably sorted by identity so that
/// each identity's images are contiguous.
pub fn write_dataset(
    dir: impl AsRef<Path>,
    items: &[(RgbImage, usize)],
    encoding: ImageEncoding,
) -> Result<WriteSummary> {
    let (w, h) = items
        .first()
        .map_or((112, 112), |(img, _)| img.dimensions());
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| items[i].1);
    let mut writer = RecordWriter::create_dir(dir, h, w)?;
    for i in order {
        let (img, label) = &items[i];
        writer
            .push_image(img, *label, encoding)
            .with_context(|| format!("item {i}"))?;
    }
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Expected {
        images: Vec<u8>,
        labels: Vec<i64>,
    }

    fn expected() -> Option<Expected> {
        let path = crate::testutil::fixture("tiny_train_rec_expected.safetensors")?;
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let images = st.tensor("images_hwc_rgb").unwrap();
        assert_eq!(images.shape(), &[6, 112, 112, 3]);
        assert_eq!(images.dtype(), safetensors::Dtype::U8);
        let labels = st.tensor("labels").unwrap();
        assert_eq!(labels.dtype(), safetensors::Dtype::I64);
        Some(Expected {
            images: images.data().to_vec(),
            labels: labels
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        })
    }

    fn fixture_paths() -> Option<(PathBuf, PathBuf, PathBuf)> {
        Some((
            crate::testutil::fixture("tiny_train.rec")?,
            crate::testutil::fixture("tiny_train.idx")?,
            crate::testutil::fixture("tiny_train_property")?,
        ))
    }

    #[test]
    fn fixture_decodes_to_expected_pixels_and_labels() {
        let (Some((rec, idx, prop)), Some(exp)) = (fixture_paths(), expected()) else {
            return;
        };
        let reader = RecordReader::open(&rec, &idx).unwrap();
        assert_eq!(reader.image_keys(), &[1, 2, 3, 4, 5, 6]);
        assert_eq!(reader.header().unwrap().labels(), vec![7.0, 10.0]);
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for i in 0..reader.len() {
            let (img, label) = reader.get(i).unwrap();
            assert_eq!(img.dimensions(), (112, 112));
            pixels.extend_from_slice(img.as_raw());
            labels.push(label);
        }
        assert_eq!(labels, exp.labels);
        assert!(
            pixels == exp.images,
            "decoded pixels differ from the fixture"
        );
        assert_eq!(reader.labels().unwrap(), exp.labels);
        assert_eq!(
            reader.identity_ranges().unwrap(),
            vec![(1, 3), (3, 5), (5, 7)]
        );
        let check = reader.check_labels().unwrap();
        assert_eq!(
            (check.num_images, check.num_distinct, check.min, check.max),
            (6, 3, 0, 2)
        );
        assert!(check.warning.is_none());
        let property = Property::read(&prop).unwrap();
        assert_eq!(
            property,
            Property {
                num_classes: 3,
                height: 112,
                width: 112
            }
        );
    }

    #[test]
    fn repacking_fixture_records_is_byte_identical() {
        let Some((rec, idx, prop)) = fixture_paths() else {
            return;
        };
        let reader = RecordReader::open(&rec, &idx).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let mut writer = RecordWriter::create(
            out.join("t.rec"),
            out.join("t.idx"),
            out.join("t_property"),
            112,
            112,
        )
        .unwrap();
        for &key in reader.image_keys() {
            let (header, encoded) = reader.read_record(key).unwrap();
            writer
                .push_encoded(&encoded, header.identity().unwrap() as usize)
                .unwrap();
        }
        let summary = writer.finish().unwrap();
        assert_eq!(
            summary,
            WriteSummary {
                num_images: 6,
                num_classes: 3
            }
        );
        assert!(std::fs::read(out.join("t.rec")).unwrap() == std::fs::read(&rec).unwrap());
        assert_eq!(
            std::fs::read_to_string(out.join("t.idx")).unwrap(),
            std::fs::read_to_string(&idx).unwrap()
        );
        assert_eq!(
            std::fs::read(out.join("t_property")).unwrap(),
            std::fs::read(&prop).unwrap()
        );
        let leftovers: Vec<_> = std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    fn test_image(seed: u8, w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x as u8).wrapping_mul(7).wrapping_add(seed),
                (y as u8).wrapping_mul(13) ^ seed,
                ((x + y) as u8).wrapping_add(seed.wrapping_mul(31)),
            ])
        })
    }

    #[test]
    fn png_roundtrip_gives_identical_pixels_and_sorted_labels() {
        let items: Vec<(RgbImage, usize)> = [2usize, 0, 1, 0, 2, 4]
            .iter()
            .enumerate()
            .map(|(i, &l)| (test_image(i as u8 * 40, 24, 20), l))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let summary = write_dataset(dir.path(), &items, ImageEncoding::Png).unwrap();
        assert_eq!(
            summary,
            WriteSummary {
                num_images: 6,
                num_classes: 5
            }
        );
        let reader = RecordReader::open_dir(dir.path()).unwrap();
        // Stable sort by label: items 1, 3 (id 0), 2 (id 1), 0, 4 (id 2), 5 (id 4).
        let order = [1, 3, 2, 0, 4, 5];
        for (i, &src) in order.iter().enumerate() {
            let (img, label) = reader.get(i).unwrap();
            assert!(img == items[src].0, "pixels of image {i} differ");
            assert_eq!(label, items[src].1 as i64);
        }
        // Identity 3 has no images: an empty range.
        assert_eq!(
            reader.identity_ranges().unwrap(),
            vec![(1, 3), (3, 4), (4, 6), (6, 6), (6, 7)]
        );
        let property = Property::read(dir.path().join("property")).unwrap();
        assert_eq!(
            property,
            Property {
                num_classes: 5,
                height: 20,
                width: 24
            }
        );
    }

    #[test]
    fn jpeg_roundtrip_is_close() {
        let img = RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([(x * 8) as u8, (y * 8) as u8, 128])
        });
        let dir = tempfile::tempdir().unwrap();
        write_dataset(
            dir.path(),
            &[(img.clone(), 0)],
            ImageEncoding::Jpeg { quality: 95 },
        )
        .unwrap();
        let (back, label) = RecordReader::open_dir(dir.path()).unwrap().get(0).unwrap();
        assert_eq!(label, 0);
        let mean_err: f64 = img
            .as_raw()
            .iter()
            .zip(back.as_raw())
            .map(|(a, b)| f64::from((i16::from(*a) - i16::from(*b)).abs()))
            .sum::<f64>()
            / img.as_raw().len() as f64;
        assert!(mean_err < 12.0, "mean abs error {mean_err}");
    }

    #[test]
    fn payload_containing_magic_is_split_and_rejoined() {
        let magic = RECORDIO_MAGIC.to_le_bytes();
        // IRHeader (24 bytes) + data holding the magic at aligned offsets 24+4 and 24+12.
        let mut data = vec![1u8, 2, 3, 4];
        data.extend(magic);
        data.extend([5, 6, 7, 8, 9, 10, 11, 12]);
        data.extend(magic);
        data.extend([13, 14, 15]);
        let mut payload = Vec::new();
        IrHeader {
            flag: 0,
            label: 3.0,
            id: 1,
            id2: 0,
            extra_labels: vec![],
        }
        .write(&mut payload);
        payload.extend(&data);
        let mut framed = Vec::new();
        frame_record(&payload, &mut framed).unwrap();
        // Three parts: flags 1, 2, 3; the magic words inside the data are dropped.
        let lrec = |at: usize| u32::from_le_bytes(framed[at + 4..at + 8].try_into().unwrap());
        assert_eq!(lrec(0) >> 29, 1);
        assert_eq!(lrec(0) & LENGTH_MASK, 28);
        assert_eq!(lrec(36) >> 29, 2);
        assert_eq!(lrec(36) & LENGTH_MASK, 8);
        assert_eq!(lrec(52) >> 29, 3);
        assert_eq!(lrec(52) & LENGTH_MASK, 3);
        assert_eq!(framed.len(), 52 + 8 + 4);

        let dir = tempfile::tempdir().unwrap();
        let mut rec = Vec::new();
        frame_record(&ranged_record(0, 2, 2), &mut rec).unwrap();
        let offset = rec.len();
        rec.extend(&framed);
        std::fs::write(dir.path().join("train.rec"), &rec).unwrap();
        std::fs::write(dir.path().join("train.idx"), format!("0\t0\n1\t{offset}\n")).unwrap();
        let reader = RecordReader::open_dir(dir.path()).unwrap();
        let (header, back) = reader.read_record(1).unwrap();
        assert_eq!(back, data);
        assert_eq!(header.identity().unwrap(), 3);
    }

    #[test]
    fn all_equal_labels_are_flagged() {
        let items: Vec<(RgbImage, usize)> = (0..4).map(|i| (test_image(i * 50, 8, 8), 0)).collect();
        let dir = tempfile::tempdir().unwrap();
        write_dataset(dir.path(), &items, ImageEncoding::Png).unwrap();
        let check = RecordReader::open_dir(dir.path())
            .unwrap()
            .check_labels()
            .unwrap();
        assert_eq!((check.num_images, check.num_distinct), (4, 1));
        let warning = check.warning.expect("all-equal labels must be flagged");
        assert!(
            warning.contains("same label 0") && warning.contains("train.rec"),
            "{warning}"
        );
    }

    #[test]
    fn writer_rejects_unsorted_labels_and_wrong_sizes_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = RecordWriter::create_dir(dir.path(), 8, 8).unwrap();
        writer
            .push_image(&test_image(1, 8, 8), 1, ImageEncoding::Png)
            .unwrap();
        let err = writer
            .push_image(&test_image(2, 8, 8), 0, ImageEncoding::Png)
            .unwrap_err();
        assert!(err.to_string().contains("non-decreasing"), "{err}");
        assert!(writer
            .push_image(&test_image(2, 9, 8), 1, ImageEncoding::Png)
            .is_err());
        drop(writer);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "temp files left"
        );
    }

    #[test]
    fn truncated_and_corrupt_files_give_clear_errors() {
        let Some((rec, idx, _)) = fixture_paths() else {
            return;
        };
        let bytes = std::fs::read(&rec).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cut = dir.path().join("cut.rec");
        std::fs::write(&cut, &bytes[..100_000]).unwrap();
        let reader = RecordReader::open(&cut, &idx).unwrap();
        assert!(reader.get(0).is_ok());
        let msg = format!("{:#}", reader.get(3).unwrap_err());
        assert!(
            msg.contains("cut.rec") && msg.contains("truncated"),
            "{msg}"
        );
        assert!(format!("{:#}", reader.check_labels().unwrap_err()).contains("cut.rec"));

        let mut bad = bytes.clone();
        bad[40] ^= 0xff; // magic of key 1
        let corrupt = dir.path().join("bad.rec");
        std::fs::write(&corrupt, &bad).unwrap();
        let msg = format!(
            "{:#}",
            RecordReader::open(&corrupt, &idx)
                .unwrap()
                .get(0)
                .unwrap_err()
        );
        assert!(
            msg.contains("bad record magic") && msg.contains("key 1"),
            "{msg}"
        );

        let mut png_broken = bytes.clone();
        png_broken[40 + 8 + 24 + 18] ^= 0x55; // the first PNG's IHDR width (CRC now fails)
        std::fs::write(&corrupt, &png_broken).unwrap();
        assert!(RecordReader::open(&corrupt, &idx).unwrap().get(0).is_err());

        let bad_idx = dir.path().join("bad.idx");
        std::fs::write(&bad_idx, "0\t0\nnot a line\n").unwrap();
        let msg = format!("{:#}", RecordReader::open(&rec, &bad_idx).unwrap_err());
        assert!(msg.contains("bad.idx line 2"), "{msg}");
        let missing = dir.path().join("missing.rec");
        let msg = format!("{:#}", RecordReader::open(&missing, &idx).unwrap_err());
        assert!(msg.contains("missing.rec"), "{msg}");
        assert!(Property::parse("3,112").is_err());
    }
}
