//! Baseline JPEG decoding that reproduces libjpeg-turbo's default RGB output bit for bit.
//!
//! The reference tools (OpenCV's `imdecode`, used by `mx.image.imdecode`, and Pillow) decode
//! with libjpeg-turbo's defaults: the accurate integer IDCT (`JDCT_ISLOW`), "fancy"
//! (triangular) chroma upsampling and table-driven YCbCr→RGB conversion. The `image` crate's
//! decoder rounds differently (pixels off by up to ~4), so verification and training images
//! would not match the reference. This module implements that default pipeline for the
//! common case: 8-bit baseline/extended Huffman JPEGs with 1 (gray) or 3 (YCbCr)
//! components and h1v1, h2v1, h2v2 or other box-upsampled chroma. Anything else
//! (progressive, arithmetic, 12-bit, CMYK, Adobe RGB, h1v2) returns `Ok(None)` so that the
//! caller can fall back to the generic decoder.

use anyhow::{anyhow, bail, ensure, Result};
use image::RgbImage;

/// Natural (row-major) index of the k-th coefficient in zig-zag order.
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];
/// Largest image decoded here (pixels); larger ones go to the generic decoder.
const MAX_PIXELS: usize = 1 << 26;

/// Decodes `data` like libjpeg-turbo with default settings. `Ok(None)`: a JPEG feature this
/// decoder does not reproduce; `Err`: the data is not a decodable baseline JPEG.
pub(crate) fn decode(data: &[u8]) -> Result<Option<RgbImage>> {
    let mut decoder = Decoder::default();
    match decoder.run(data)? {
        Flow::Unsupported => Ok(None),
        Flow::Done => decoder.finish(),
    }
}

enum Flow {
    Done,
    Unsupported,
}

#[derive(Debug, Clone, Default)]
struct Component {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
    /// Blocks per row / column of the sample plane (whole MCUs).
    bw: usize,
    bh: usize,
    plane: Vec<u8>,
    pred: i32,
    dc: usize,
    ac: usize,
    scanned: bool,
}

#[derive(Debug, Default)]
struct Decoder {
    width: usize,
    height: usize,
    comps: Vec<Component>,
    hmax: usize,
    vmax: usize,
    mcux: usize,
    mcuy: usize,
    quant: [Option<[i32; 64]>; 4],
    dc_tables: [Option<Huffman>; 4],
    ac_tables: [Option<Huffman>; 4],
    restart_interval: usize,
    adobe_transform: Option<u8>,
}

impl Decoder {
    fn run(&mut self, data: &[u8]) -> Result<Flow> {
        ensure!(
            data.starts_with(&[0xFF, 0xD8]),
            "not a JPEG (no SOI marker)"
        );
        let mut pos = 2;
        loop {
            // Skip to the next marker (tolerating stray bytes and fill 0xFFs).
            while pos < data.len() && data[pos] != 0xFF {
                pos += 1;
            }
            while pos < data.len() && data[pos] == 0xFF {
                pos += 1;
            }
            let Some(&marker) = data.get(pos) else {
                return Ok(Flow::Done); // missing EOI: libjpeg warns and finishes
            };
            pos += 1;
            match marker {
                0xD9 => return Ok(Flow::Done),
                0xD0..=0xD8 | 0x01 => continue,
                _ => {}
            }
            let len = data
                .get(pos..pos + 2)
                .map(|b| usize::from(b[0]) << 8 | usize::from(b[1]))
                .ok_or_else(|| anyhow!("JPEG segment header is truncated"))?;
            ensure!(len >= 2, "JPEG segment length {len} is invalid");
            let seg = data
                .get(pos + 2..pos + len)
                .ok_or_else(|| anyhow!("JPEG segment 0xFF{marker:02X} is truncated"))?;
            pos += len;
            match marker {
                0xDB => self.read_dqt(seg)?,
                0xC4 => self.read_dht(seg)?,
                0xDD => {
                    ensure!(seg.len() >= 2, "DRI segment is truncated");
                    self.restart_interval = usize::from(seg[0]) << 8 | usize::from(seg[1]);
                }
                0xC0 | 0xC1 => {
                    let supported = self.read_sof(seg)?;
                    if !supported {
                        return Ok(Flow::Unsupported);
                    }
                }
                0xC2 | 0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => {
                    return Ok(Flow::Unsupported)
                }
                0xEE if seg.len() >= 12 && seg.starts_with(b"Adobe") => {
                    self.adobe_transform = Some(seg[11]);
                }
                0xDA => {
                    let supported = self.read_sos_and_scan(seg, data, &mut pos)?;
                    if !supported {
                        return Ok(Flow::Unsupported);
                    }
                }
                _ => {} // APPn, COM, DNL, ...
            }
        }
    }

    fn read_dqt(&mut self, mut seg: &[u8]) -> Result<()> {
        while let Some((&pq_tq, rest)) = seg.split_first() {
            let (precision, id) = (pq_tq >> 4, usize::from(pq_tq & 15));
            ensure!(
                id < 4 && precision < 2,
                "DQT table {id} (precision {precision}) is invalid"
            );
            let size = if precision == 0 { 64 } else { 128 };
            let body = rest
                .get(..size)
                .ok_or_else(|| anyhow!("DQT segment is truncated"))?;
            let mut table = [0i32; 64];
            for (k, q) in table.iter_mut().enumerate() {
                *q = if precision == 0 {
                    i32::from(body[k])
                } else {
                    i32::from(body[2 * k]) << 8 | i32::from(body[2 * k + 1])
                };
            }
            self.quant[id] = Some(table);
            seg = &rest[size..];
        }
        Ok(())
    }

    fn read_dht(&mut self, mut seg: &[u8]) -> Result<()> {
        while let Some((&tc_th, rest)) = seg.split_first() {
            let (class, id) = (tc_th >> 4, usize::from(tc_th & 15));
            ensure!(
                class < 2 && id < 4,
                "DHT table class {class} id {id} is invalid"
            );
            let counts = rest
                .get(..16)
                .ok_or_else(|| anyhow!("DHT segment is truncated"))?;
            let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
            let values = rest
                .get(16..16 + total)
                .ok_or_else(|| anyhow!("DHT segment is truncated"))?;
            let table = Huffman::new(counts, values.to_vec())?;
            if class == 0 {
                self.dc_tables[id] = Some(table);
            } else {
                self.ac_tables[id] = Some(table);
            }
            seg = &rest[16 + total..];
        }
        Ok(())
    }

    /// Reads the frame header; false when the frame is outside the reproduced subset.
    fn read_sof(&mut self, seg: &[u8]) -> Result<bool> {
        ensure!(self.comps.is_empty(), "JPEG has more than one frame header");
        ensure!(seg.len() >= 6, "SOF segment is truncated");
        let precision = seg[0];
        self.height = usize::from(seg[1]) << 8 | usize::from(seg[2]);
        self.width = usize::from(seg[3]) << 8 | usize::from(seg[4]);
        let n = usize::from(seg[5]);
        ensure!(seg.len() >= 6 + 3 * n, "SOF segment is truncated");
        if precision != 8 || !(n == 1 || n == 3) || self.height == 0 || self.width == 0 {
            return Ok(false);
        }
        if self.width * self.height > MAX_PIXELS {
            return Ok(false);
        }
        for c in seg[6..6 + 3 * n].chunks_exact(3) {
            let (h, v, tq) = (
                usize::from(c[1] >> 4),
                usize::from(c[1] & 15),
                usize::from(c[2]),
            );
            ensure!(
                (1..=4).contains(&h) && (1..=4).contains(&v) && tq < 4,
                "SOF component is invalid"
            );
            self.comps.push(Component {
                id: c[0],
                h,
                v,
                tq,
                ..Default::default()
            });
        }
        self.hmax = self.comps.iter().map(|c| c.h).max().unwrap_or(1);
        self.vmax = self.comps.iter().map(|c| c.v).max().unwrap_or(1);
        self.mcux = self.width.div_ceil(8 * self.hmax);
        self.mcuy = self.height.div_ceil(8 * self.vmax);
        for c in &mut self.comps {
            c.bw = self.mcux * c.h;
            c.bh = self.mcuy * c.v;
            c.plane = vec![0; c.bw * 8 * c.bh * 8];
        }
        Ok(true)
    }

    /// Reads a scan header and decodes the entropy-coded data after it, moving `pos` past it.
    fn read_sos_and_scan(&mut self, seg: &[u8], data: &[u8], pos: &mut usize) -> Result<bool> {
        ensure!(
            !self.comps.is_empty(),
            "JPEG scan comes before the frame header"
        );
        let ns = usize::from(*seg.first().ok_or_else(|| anyhow!("SOS segment is empty"))?);
        ensure!(
            (1..=4).contains(&ns) && seg.len() >= 4 + 2 * ns,
            "SOS segment is invalid"
        );
        let mut members = Vec::with_capacity(ns);
        for s in seg[1..1 + 2 * ns].chunks_exact(2) {
            let ci = self
                .comps
                .iter()
                .position(|c| c.id == s[0])
                .ok_or_else(|| anyhow!("JPEG scan names unknown component {}", s[0]))?;
            let (dc, ac) = (usize::from(s[1] >> 4), usize::from(s[1] & 15));
            ensure!(dc < 4 && ac < 4, "JPEG scan table selector is invalid");
            self.comps[ci].dc = dc;
            self.comps[ci].ac = ac;
            members.push(ci);
        }
        let spectral = &seg[1 + 2 * ns..];
        if spectral[0] != 0 || spectral[1] != 63 || spectral[2] != 0 {
            return Ok(false);
        }
        let mut reader = BitReader::new(data, *pos);
        self.decode_scan(&members, &mut reader)?;
        *pos = reader.pos;
        Ok(true)
    }

    fn decode_scan(&mut self, members: &[usize], br: &mut BitReader) -> Result<()> {
        for &ci in members {
            let c = &mut self.comps[ci];
            c.pred = 0;
            c.scanned = true;
            ensure!(
                self.quant[c.tq].is_some(),
                "JPEG quantisation table {} is missing",
                c.tq
            );
            ensure!(
                self.dc_tables[c.dc].is_some() && self.ac_tables[c.ac].is_some(),
                "JPEG Huffman table is missing"
            );
        }
        // Block positions of each MCU: interleaved scans cover whole MCUs, single-component
        // scans cover just the component's own blocks.
        let mcus: Vec<Vec<(usize, usize, usize)>> = if members.len() == 1 {
            let ci = members[0];
            let c = &self.comps[ci];
            let cols = (self.width * c.h).div_ceil(self.hmax).div_ceil(8);
            let rows = (self.height * c.v).div_ceil(self.vmax).div_ceil(8);
            (0..rows)
                .flat_map(|by| (0..cols).map(move |bx| vec![(ci, bx, by)]))
                .collect()
        } else {
            let mut all = Vec::with_capacity(self.mcux * self.mcuy);
            for my in 0..self.mcuy {
                for mx in 0..self.mcux {
                    let mut blocks = Vec::new();
                    for &ci in members {
                        let c = &self.comps[ci];
                        for v in 0..c.v {
                            for h in 0..c.h {
                                blocks.push((ci, mx * c.h + h, my * c.v + v));
                            }
                        }
                    }
                    all.push(blocks);
                }
            }
            all
        };
        for (i, blocks) in mcus.iter().enumerate() {
            if i > 0 && self.restart_interval > 0 && i % self.restart_interval == 0 {
                br.restart()?;
                for &ci in members {
                    self.comps[ci].pred = 0;
                }
            }
            for &(ci, bx, by) in blocks {
                self.decode_block(ci, bx, by, br)?;
            }
        }
        br.skip_to_marker();
        Ok(())
    }

    fn decode_block(&mut self, ci: usize, bx: usize, by: usize, br: &mut BitReader) -> Result<()> {
        let c = &self.comps[ci];
        let (Some(q), Some(dc), Some(ac)) = (
            self.quant[c.tq].as_ref(),
            self.dc_tables[c.dc].as_ref(),
            self.ac_tables[c.ac].as_ref(),
        ) else {
            bail!("JPEG table missing for component {}", c.id);
        };
        let mut coef = [0i32; 64];
        let t = dc.decode(br)?;
        ensure!(t <= 16, "JPEG DC magnitude category {t} is invalid");
        // libjpeg keeps coefficients as 16-bit JCOEF before dequantising.
        let pred = c.pred.wrapping_add(br.receive_extend(t));
        coef[0] = i32::from(pred as i16) * q[0];
        let mut k = 1;
        while k < 64 {
            let rs = ac.decode(br)?;
            let (run, size) = (usize::from(rs >> 4), rs & 15);
            if size == 0 {
                if run != 15 {
                    break;
                }
                k += 16;
                continue;
            }
            k += run;
            ensure!(k < 64, "JPEG AC coefficients overrun the block");
            coef[ZIGZAG[k]] = i32::from(br.receive_extend(size) as i16) * q[k];
            k += 1;
        }
        let c = &mut self.comps[ci];
        c.pred = pred;
        let stride = c.bw * 8;
        let mut out = [0u8; 64];
        idct_islow(&coef, &mut out);
        for (r, row) in out.chunks_exact(8).enumerate() {
            let start = (by * 8 + r) * stride + bx * 8;
            c.plane[start..start + 8].copy_from_slice(row);
        }
        Ok(())
    }

    fn finish(self) -> Result<Option<RgbImage>> {
        ensure!(!self.comps.is_empty(), "JPEG has no frame header");
        if let Some(c) = self.comps.iter().find(|c| !c.scanned) {
            bail!("JPEG component {} has no scan data", c.id);
        }
        let (w, h) = (self.width, self.height);
        let rgb_ids =
            self.comps.len() == 3 && self.comps.iter().map(|c| c.id).eq([b'R', b'G', b'B']);
        if self.adobe_transform == Some(0) || rgb_ids {
            return Ok(None); // RGB-coded JPEG: not the YCbCr path reproduced here
        }
        let mut planes = Vec::with_capacity(self.comps.len());
        for c in &self.comps {
            match self.upsample(c) {
                Some(p) => planes.push(p),
                None => return Ok(None),
            }
        }
        let mut img = RgbImage::new(w as u32, h as u32);
        let out = &mut *img;
        if planes.len() == 1 {
            for (px, &y) in out.chunks_exact_mut(3).zip(&planes[0]) {
                px.copy_from_slice(&[y, y, y]);
            }
        } else {
            let conv = YccTables::new();
            for (i, px) in out.chunks_exact_mut(3).enumerate() {
                px.copy_from_slice(&conv.rgb(planes[0][i], planes[1][i], planes[2][i]));
            }
        }
        Ok(Some(img))
    }

    /// Full-resolution `width × height` samples of one component, upsampled like libjpeg.
    fn upsample(&self, c: &Component) -> Option<Vec<u8>> {
        let (w, h) = (self.width, self.height);
        if !self.hmax.is_multiple_of(c.h) || !self.vmax.is_multiple_of(c.v) {
            return None;
        }
        let (rh, rv) = (self.hmax / c.h, self.vmax / c.v);
        let stride = c.bw * 8;
        let dw = (w * c.h).div_ceil(self.hmax);
        let dh = (h * c.v).div_ceil(self.vmax);
        let row = |y: usize| &c.plane[y * stride..y * stride + dw];
        let mut out = vec![0u8; w * h];
        match (rh, rv) {
            (1, 1) => {
                for (y, dst) in out.chunks_exact_mut(w).enumerate() {
                    dst.copy_from_slice(&row(y)[..w]);
                }
            }
            (2, 1) if dw > 2 => {
                let mut wide = vec![0u8; 2 * dw];
                for (y, dst) in out.chunks_exact_mut(w).enumerate() {
                    h2v1_fancy(row(y), &mut wide);
                    dst.copy_from_slice(&wide[..w]);
                }
            }
            (2, 2) if dw > 2 => {
                let mut wide = vec![0u8; 2 * dw];
                for (y, dst) in out.chunks_exact_mut(w).enumerate() {
                    let inrow = y / 2;
                    let other = if y % 2 == 0 {
                        inrow.saturating_sub(1)
                    } else {
                        (inrow + 1).min(dh - 1)
                    };
                    h2v2_fancy(row(inrow), row(other), &mut wide);
                    dst.copy_from_slice(&wide[..w]);
                }
            }
            (1, 2) => return None, // libjpeg-turbo's h1v2 fancy path is not reproduced
            _ => {
                for (y, dst) in out.chunks_exact_mut(w).enumerate() {
                    let src = row(y / rv);
                    for (x, d) in dst.iter_mut().enumerate() {
                        *d = src[x / rh];
                    }
                }
            }
        }
        Some(out)
    }
}

/// libjpeg's h2v1 "fancy" upsampling: 3/4 nearest + 1/4 next, alternating rounding bias.
fn h2v1_fancy(input: &[u8], out: &mut [u8]) {
    let n = input.len();
    let s = |i: usize| i32::from(input[i]);
    out[0] = input[0];
    out[1] = ((s(0) * 3 + s(1) + 2) >> 2) as u8;
    for i in 1..n - 1 {
        let v = s(i) * 3;
        out[2 * i] = ((v + s(i - 1) + 1) >> 2) as u8;
        out[2 * i + 1] = ((v + s(i + 1) + 2) >> 2) as u8;
    }
    out[2 * n - 2] = ((s(n - 1) * 3 + s(n - 2) + 1) >> 2) as u8;
    out[2 * n - 1] = input[n - 1];
}

/// libjpeg's h2v2 "fancy" upsampling of one output row: `near` is the input row of this
/// output row, `far` the adjacent input row (above for even, below for odd output rows).
fn h2v2_fancy(near: &[u8], far: &[u8], out: &mut [u8]) {
    let n = near.len();
    let col = |i: usize| i32::from(near[i]) * 3 + i32::from(far[i]);
    let this = col(0);
    out[0] = ((this * 4 + 8) >> 4) as u8;
    out[1] = ((this * 3 + col(1) + 7) >> 4) as u8;
    for i in 1..n - 1 {
        let this = col(i);
        out[2 * i] = ((this * 3 + col(i - 1) + 8) >> 4) as u8;
        out[2 * i + 1] = ((this * 3 + col(i + 1) + 7) >> 4) as u8;
    }
    let last = col(n - 1);
    out[2 * n - 2] = ((last * 3 + col(n - 2) + 8) >> 4) as u8;
    out[2 * n - 1] = ((last * 4 + 7) >> 4) as u8;
}

/// libjpeg's YCbCr→RGB tables (16-bit fixed point, `jdcolor.c` conventions).
struct YccTables {
    cr_r: [i32; 256],
    cb_b: [i32; 256],
    cr_g: [i32; 256],
    cb_g: [i32; 256],
}

impl YccTables {
    fn new() -> Self {
        const SCALE: i32 = 16;
        const HALF: i32 = 1 << (SCALE - 1);
        let fix = |x: f64| (x * f64::from(1 << SCALE) + 0.5) as i32;
        let mut t = Self {
            cr_r: [0; 256],
            cb_b: [0; 256],
            cr_g: [0; 256],
            cb_g: [0; 256],
        };
        for i in 0..256 {
            let x = i as i32 - 128;
            t.cr_r[i] = (fix(1.40200) * x + HALF) >> SCALE;
            t.cb_b[i] = (fix(1.77200) * x + HALF) >> SCALE;
            t.cr_g[i] = -fix(0.71414) * x;
            t.cb_g[i] = -fix(0.34414) * x + HALF;
        }
        t
    }

    fn rgb(&self, y: u8, cb: u8, cr: u8) -> [u8; 3] {
        let (y, cb, cr) = (i32::from(y), usize::from(cb), usize::from(cr));
        let clamp = |v: i32| v.clamp(0, 255) as u8;
        [
            clamp(y + self.cr_r[cr]),
            clamp(y + ((self.cb_g[cb] + self.cr_g[cr]) >> 16)),
            clamp(y + self.cb_b[cb]),
        ]
    }
}

/// libjpeg's accurate integer inverse DCT (`jpeg_idct_islow`): Loeffler–Ligtenberg–
/// Moschytz with 13-bit constants, 2 extra bits of precision between the passes, and the
/// same range-limit wrap-around for out-of-range results.
fn idct_islow(coef: &[i32; 64], out: &mut [u8; 64]) {
    const CONST_BITS: u32 = 13;
    const PASS1_BITS: u32 = 2;
    let mut ws = [0i32; 64];
    for col in 0..8 {
        let at = |r: usize| i64::from(coef[r * 8 + col]);
        if (1..8).all(|r| at(r) == 0) {
            let dc = (at(0) << PASS1_BITS) as i32;
            for r in 0..8 {
                ws[r * 8 + col] = dc;
            }
            continue;
        }
        let v = butterfly([at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7)]);
        for (r, x) in v.iter().enumerate() {
            ws[r * 8 + col] = descale(*x, CONST_BITS - PASS1_BITS) as i32;
        }
    }
    for r in 0..8 {
        let w: Vec<i64> = ws[r * 8..r * 8 + 8].iter().map(|&x| i64::from(x)).collect();
        let dst = &mut out[r * 8..r * 8 + 8];
        if w[1..].iter().all(|&x| x == 0) {
            dst.fill(range_limit(descale(w[0], PASS1_BITS + 3)));
            continue;
        }
        let v = butterfly([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        for (d, x) in dst.iter_mut().zip(v) {
            *d = range_limit(descale(x, CONST_BITS + PASS1_BITS + 3));
        }
    }
}

/// One 8-point islow IDCT pass in 64-bit arithmetic (libjpeg-turbo's `JLONG` on 64-bit
/// Linux); returns the 8 outputs scaled by 2^13, not yet descaled.
fn butterfly(i: [i64; 8]) -> [i64; 8] {
    const F0_298: i64 = 2446;
    const F0_390: i64 = 3196;
    const F0_541: i64 = 4433;
    const F0_765: i64 = 6270;
    const F0_899: i64 = 7373;
    const F1_175: i64 = 9633;
    const F1_501: i64 = 12299;
    const F1_847: i64 = 15137;
    const F1_961: i64 = 16069;
    const F2_053: i64 = 16819;
    const F2_562: i64 = 20995;
    const F3_072: i64 = 25172;
    // Even part.
    let z1 = (i[2] + i[6]) * F0_541;
    let tmp2 = z1 - i[6] * F1_847;
    let tmp3 = z1 + i[2] * F0_765;
    let tmp0 = (i[0] + i[4]) << 13;
    let tmp1 = (i[0] - i[4]) << 13;
    let (t10, t13, t11, t12) = (tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2);
    // Odd part.
    let (o0, o1, o2, o3) = (i[7], i[5], i[3], i[1]);
    let z5 = (o0 + o2 + o1 + o3) * F1_175;
    let z1 = -(o0 + o3) * F0_899;
    let z2 = -(o1 + o2) * F2_562;
    let z3 = -(o0 + o2) * F1_961 + z5;
    let z4 = -(o1 + o3) * F0_390 + z5;
    let o0 = o0 * F0_298 + z1 + z3;
    let o1 = o1 * F2_053 + z2 + z4;
    let o2 = o2 * F3_072 + z2 + z3;
    let o3 = o3 * F1_501 + z1 + z4;
    [
        t10 + o3,
        t11 + o2,
        t12 + o1,
        t13 + o0,
        t13 - o0,
        t12 - o1,
        t11 - o2,
        t10 - o3,
    ]
}

fn descale(x: i64, n: u32) -> i64 {
    (x + (1 << (n - 1))) >> n
}

/// libjpeg's IDCT output range limit: `x + 128` clamped to 0..=255 within ±512, with the
/// same wrap-around (`x & 1023`) beyond that.
fn range_limit(x: i64) -> u8 {
    // libjpeg truncates the descaled value to `int` before masking.
    let i = (x as i32) & 1023;
    match i {
        0..=127 => (i + 128) as u8,
        128..=511 => 255,
        512..=895 => 0,
        _ => (i - 896) as u8,
    }
}

#[derive(Debug, Clone)]
struct Huffman {
    maxcode: [i32; 17],
    mincode: [i32; 17],
    valptr: [i32; 17],
    values: Vec<u8>,
}

impl Huffman {
    fn new(counts: &[u8], values: Vec<u8>) -> Result<Self> {
        let mut t = Self {
            maxcode: [-1; 17],
            mincode: [0; 17],
            valptr: [0; 17],
            values,
        };
        let (mut code, mut k) = (0i32, 0i32);
        for len in 1..=16 {
            let n = i32::from(counts[len - 1]);
            if n > 0 {
                t.valptr[len] = k;
                t.mincode[len] = code;
                code += n;
                k += n;
                t.maxcode[len] = code - 1;
            }
            ensure!(code <= 1 << len, "JPEG Huffman table is over-subscribed");
            code <<= 1;
        }
        Ok(t)
    }

    fn decode(&self, br: &mut BitReader) -> Result<u8> {
        let mut code = 0i32;
        for len in 1..=16 {
            code = (code << 1) | br.bit();
            if code <= self.maxcode[len] {
                let idx = (self.valptr[len] + code - self.mincode[len]) as usize;
                return self
                    .values
                    .get(idx)
                    .copied()
                    .ok_or_else(|| anyhow!("JPEG Huffman code out of range"));
            }
        }
        bail!("corrupt JPEG data: invalid Huffman code")
    }
}

/// Reads entropy-coded bits, removing byte stuffing. At a marker (or the end of the data)
/// it supplies zero bits, as libjpeg does.
struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    bits: u32,
    at_marker: bool,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Self {
            data,
            pos,
            acc: 0,
            bits: 0,
            at_marker: false,
        }
    }

    fn fill(&mut self) {
        while self.bits <= 56 {
            let byte = if self.at_marker {
                0
            } else {
                match (self.data.get(self.pos), self.data.get(self.pos + 1)) {
                    (Some(0xFF), Some(0x00)) => {
                        self.pos += 2;
                        0xFF
                    }
                    (Some(0xFF), _) | (None, _) => {
                        self.at_marker = true;
                        0
                    }
                    (Some(&b), _) => {
                        self.pos += 1;
                        b
                    }
                }
            };
            self.acc |= u64::from(byte) << (56 - self.bits);
            self.bits += 8;
        }
    }

    fn bit(&mut self) -> i32 {
        if self.bits == 0 {
            self.fill();
        }
        let b = (self.acc >> 63) as i32;
        self.acc <<= 1;
        self.bits -= 1;
        b
    }

    /// Reads `s` bits and sign-extends them as a JPEG magnitude of category `s`.
    fn receive_extend(&mut self, s: u8) -> i32 {
        if s == 0 {
            return 0;
        }
        let s = u32::from(s.min(16));
        let mut v = 0i32;
        for _ in 0..s {
            v = (v << 1) | self.bit();
        }
        if v < 1 << (s - 1) {
            v - (1 << s) + 1
        } else {
            v
        }
    }

    /// Discards buffered bits and consumes the expected RSTn marker.
    fn restart(&mut self) -> Result<()> {
        self.acc = 0;
        self.bits = 0;
        self.at_marker = false;
        self.skip_to_marker();
        match self.data.get(self.pos..self.pos + 2) {
            Some([0xFF, m]) if (0xD0..=0xD7).contains(m) => {
                self.pos += 2;
                Ok(())
            }
            _ => bail!("corrupt JPEG data: missing restart marker"),
        }
    }

    /// Moves `pos` to the next marker that is not byte stuffing.
    fn skip_to_marker(&mut self) {
        while self.pos < self.data.len() {
            if self.data[self.pos] == 0xFF && self.data.get(self.pos + 1).is_some_and(|&b| b != 0) {
                return;
            }
            self.pos += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_limit_matches_libjpeg_table() {
        assert_eq!(range_limit(-128), 0);
        assert_eq!(range_limit(-129), 0);
        assert_eq!(range_limit(-512), 0);
        assert_eq!(range_limit(0), 128);
        assert_eq!(range_limit(127), 255);
        assert_eq!(range_limit(511), 255);
        assert_eq!(range_limit(-1), 127);
        assert_eq!(range_limit(512), 0); // wraps like libjpeg's table
    }

    #[test]
    fn dc_only_block_is_flat_and_centred() {
        // A DC coefficient of 8*k gives a flat block of 128 + k.
        let mut coef = [0i32; 64];
        coef[0] = 80;
        let mut out = [0u8; 64];
        idct_islow(&coef, &mut out);
        assert!(out.iter().all(|&v| v == 138), "{out:?}");
    }

    #[test]
    fn single_ac_coefficient_matches_float_idct() {
        // Exact IDCT: f(x,y) = 1/4 C(u)C(v) F cos((2x+1)uπ/16) cos((2y+1)vπ/16).
        for (u, v, f) in [
            (1usize, 0usize, 200i32),
            (0, 3, -150),
            (2, 5, 90),
            (7, 7, 300),
        ] {
            let mut coef = [0i32; 64];
            coef[v * 8 + u] = f;
            let mut out = [0u8; 64];
            idct_islow(&coef, &mut out);
            for y in 0..8 {
                for x in 0..8 {
                    let c = |k: usize| {
                        if k == 0 {
                            std::f64::consts::FRAC_1_SQRT_2
                        } else {
                            1.0
                        }
                    };
                    let pi = std::f64::consts::PI;
                    let val = 0.25
                        * c(u)
                        * c(v)
                        * f64::from(f)
                        * ((2 * x + 1) as f64 * u as f64 * pi / 16.0).cos()
                        * ((2 * y + 1) as f64 * v as f64 * pi / 16.0).cos();
                    let expect = (val + 128.0).round().clamp(0.0, 255.0);
                    let got = f64::from(out[y * 8 + x]);
                    assert!(
                        (got - expect).abs() <= 1.0,
                        "u{u} v{v} ({x},{y}): {got} vs {expect}"
                    );
                }
            }
        }
    }

    #[test]
    fn fancy_upsampling_of_a_ramp() {
        let mut out = [0u8; 8];
        h2v1_fancy(&[0, 40, 80, 120], &mut out);
        assert_eq!(out, [0, 10, 30, 50, 70, 90, 110, 120]);
        h2v2_fancy(&[0, 40, 80, 120], &[0, 40, 80, 120], &mut out);
        assert_eq!(out, [0, 10, 30, 50, 70, 90, 110, 120]);
    }

    #[test]
    fn ycc_conversion_of_grey_and_primaries() {
        let t = YccTables::new();
        assert_eq!(t.rgb(77, 128, 128), [77, 77, 77]);
        // Full-range BT.601 red is Y 76, Cb 85, Cr 255.
        let [r, g, b] = t.rgb(76, 85, 255);
        assert!(r >= 253 && g <= 2 && b <= 2, "{r} {g} {b}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode(b"not a jpeg").is_err());
        let mut fake = vec![0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 8, 0, 16, 0, 16, 3];
        fake.extend([1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
        fake.extend([0xFF, 0xDA, 0x00, 0x0C, 3, 1, 0, 2, 0x11, 3, 0x11, 0, 63, 0]);
        fake.extend([0x12, 0x34]);
        assert!(decode(&fake).is_err());
        for cut in 0..fake.len() {
            let _ = decode(&fake[..cut]);
        }
    }
}
