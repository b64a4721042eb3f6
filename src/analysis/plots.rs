//! Report plots drawn with tiny-skia and the built-in bitmap font, saved as PNG:
//! genuine vs impostor score densities with the EER threshold, ROC (log FMR axis) and
//! DET (log-log) curves.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use image::RgbImage;
use tiny_skia::{Color, FillRule, Paint, PathBuilder, Pixmap, Rect, Stroke, StrokeDash, Transform};

use super::font::{text_pixels, text_width, GLYPH_H};
use super::histogram::PairHistogram;
use super::metrics::RocCurve;

/// Plot width in pixels.
pub const WIDTH: u32 = 800;
/// Plot height in pixels.
pub const HEIGHT: u32 = 560;

const GENUINE: [u8; 3] = [30, 140, 70];
const IMPOSTOR: [u8; 3] = [200, 50, 50];
const CURVE: [u8; 3] = [40, 80, 190];
const INK: [u8; 3] = [30, 30, 30];
const GRID: [u8; 3] = [225, 225, 225];

/// Scale of the bitmap font (one font pixel = `FONT` image pixels).
const FONT: f32 = 2.0;
const LEFT: f32 = 100.0;
const RIGHT: f32 = 24.0;
const TOP: f32 = 44.0;
const BOTTOM: f32 = 62.0;

/// How an axis maps values to pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scale {
    Linear(f64, f64),
    /// log10 between the two (positive) bounds.
    Log(f64, f64),
}

impl Scale {
    /// Position in [0, 1]; values outside (or non-positive on a log axis) are clamped.
    fn frac(self, v: f64) -> f64 {
        let f = match self {
            Scale::Linear(a, b) => (v - a) / (b - a),
            Scale::Log(a, b) => (v.max(a).log10() - a.log10()) / (b.log10() - a.log10()),
        };
        f.clamp(0.0, 1.0)
    }
}

/// A plot under construction: pixmap plus data-to-pixel mapping.
struct Plot {
    pixmap: Pixmap,
    x: Scale,
    y: Scale,
}

fn paint(rgb: [u8; 3], alpha: u8) -> Paint<'static> {
    let mut p = Paint::default();
    p.set_color_rgba8(rgb[0], rgb[1], rgb[2], alpha);
    p.anti_alias = true;
    p
}

impl Plot {
    fn new(x: Scale, y: Scale) -> Result<Self> {
        let mut pixmap =
            Pixmap::new(WIDTH, HEIGHT).ok_or_else(|| anyhow!("cannot allocate the plot"))?;
        pixmap.fill(Color::WHITE);
        Ok(Self { pixmap, x, y })
    }

    fn area(&self) -> (f32, f32, f32, f32) {
        (
            LEFT,
            TOP,
            WIDTH as f32 - LEFT - RIGHT,
            HEIGHT as f32 - TOP - BOTTOM,
        )
    }

    fn px(&self, x: f64, y: f64) -> (f32, f32) {
        let (l, t, w, h) = self.area();
        (
            l + self.x.frac(x) as f32 * w,
            t + h - self.y.frac(y) as f32 * h,
        )
    }

    fn line(&mut self, pts: &[(f32, f32)], rgb: [u8; 3], width: f32, dash: bool) {
        let mut pb = PathBuilder::new();
        let Some(&(x0, y0)) = pts.first() else { return };
        pb.move_to(x0, y0);
        for &(x, y) in &pts[1..] {
            pb.line_to(x, y);
        }
        let Some(path) = pb.finish() else { return };
        let stroke = Stroke {
            width,
            dash: if dash {
                StrokeDash::new(vec![8.0, 5.0], 0.0)
            } else {
                None
            },
            ..Stroke::default()
        };
        self.pixmap.stroke_path(
            &path,
            &paint(rgb, 255),
            &stroke,
            Transform::identity(),
            None,
        );
    }

    fn fill(&mut self, pts: &[(f32, f32)], rgb: [u8; 3], alpha: u8) {
        let mut pb = PathBuilder::new();
        let Some(&(x0, y0)) = pts.first() else { return };
        pb.move_to(x0, y0);
        for &(x, y) in &pts[1..] {
            pb.line_to(x, y);
        }
        pb.close();
        if let Some(path) = pb.finish() {
            self.pixmap.fill_path(
                &path,
                &paint(rgb, alpha),
                FillRule::Winding,
                Transform::identity(),
                None,
            );
        }
    }

    fn rect(&mut self, x: f32, y: f32, w: f32, h: f32, rgb: [u8; 3]) {
        if let Some(r) = Rect::from_xywh(x, y, w, h) {
            let mut p = paint(rgb, 255);
            p.anti_alias = false;
            self.pixmap.fill_rect(r, &p, Transform::identity(), None);
        }
    }

    /// Text with its top-left corner at (x, y); `vertical` rotates it 90° counter-clockwise
    /// (then (x, y) is the bottom-left corner).
    fn text(&mut self, s: &str, x: f32, y: f32, rgb: [u8; 3], vertical: bool) {
        let pixels: Vec<(usize, usize)> = text_pixels(s).collect();
        for (gx, gy) in pixels {
            let (dx, dy) = (gx as f32 * FONT, gy as f32 * FONT);
            let (px, py) = if vertical {
                (x + dy, y - dx - FONT)
            } else {
                (x + dx, y + dy)
            };
            self.rect(px, py, FONT, FONT, rgb);
        }
    }

    fn text_centered(&mut self, s: &str, cx: f32, y: f32, rgb: [u8; 3]) {
        let w = text_width(s) as f32 * FONT;
        self.text(s, cx - w / 2.0, y, rgb, false);
    }

    /// Frame, grid lines and tick labels at the given data values, title and axis names.
    fn axes(&mut self, xticks: &[(f64, String)], yticks: &[(f64, String)], labels: [&str; 3]) {
        let (l, t, w, h) = self.area();
        for (v, s) in xticks {
            let (x, _) = self.px(*v, 0.0);
            self.line(&[(x, t), (x, t + h)], GRID, 1.0, false);
            self.text_centered(s, x, t + h + 8.0, INK);
        }
        for (v, s) in yticks {
            let (_, y) = self.px(0.0, *v);
            self.line(&[(l, y), (l + w, y)], GRID, 1.0, false);
            let tw = text_width(s) as f32 * FONT;
            self.text(s, l - tw - 8.0, y - GLYPH_H as f32 * FONT / 2.0, INK, false);
        }
        self.line(
            &[(l, t), (l + w, t), (l + w, t + h), (l, t + h), (l, t)],
            INK,
            1.5,
            false,
        );
        let [title, xlabel, ylabel] = labels;
        self.text_centered(title, l + w / 2.0, 12.0, INK);
        self.text_centered(xlabel, l + w / 2.0, HEIGHT as f32 - 26.0, INK);
        let yl = text_width(ylabel) as f32 * FONT;
        self.text(ylabel, 10.0, t + h / 2.0 + yl / 2.0, INK, true);
    }

    /// Legend entries (colour swatch + text) stacked in the top-right corner.
    fn legend(&mut self, entries: &[([u8; 3], &str)]) {
        let (l, t, w, _) = self.area();
        let width = entries
            .iter()
            .map(|(_, s)| text_width(s))
            .max()
            .unwrap_or(0) as f32
            * FONT;
        let x = l + w - width - 40.0;
        for (k, (rgb, s)) in entries.iter().enumerate() {
            let y = t + 12.0 + k as f32 * 22.0;
            self.rect(x, y, 20.0, 12.0, *rgb);
            self.text(s, x + 28.0, y - 1.0, INK, false);
        }
    }

    fn save(self, path: &Path) -> Result<()> {
        // Opaque background: premultiplied RGBA equals straight RGBA.
        let rgb: Vec<u8> = self
            .pixmap
            .data()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect();
        RgbImage::from_raw(WIDTH, HEIGHT, rgb)
            .ok_or_else(|| anyhow!("plot buffer has the wrong size"))?
            .save(path)
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// Short decimal label (`0.5`, `-1`, `12`).
fn fmt_tick(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

/// A "nice" step (1, 2 or 5 × 10^k) giving about `count` ticks over `span`.
fn nice_step(span: f64, count: f64) -> f64 {
    let raw = span / count;
    let mag = 10f64.powf(raw.log10().floor());
    let r = raw / mag;
    mag * if r < 1.5 {
        1.0
    } else if r < 3.5 {
        2.0
    } else if r < 7.5 {
        5.0
    } else {
        10.0
    }
}

/// Genuine and impostor densities of the histogram (each integrates to 1 over [-1, 1]).
pub fn densities(h: &PairHistogram) -> (Vec<f64>, Vec<f64>) {
    let width = 2.0 / h.bins().max(1) as f64;
    let dens = |c: &[u64]| {
        let total: u64 = c.iter().sum();
        c.iter()
            .map(|&v| {
                if total == 0 {
                    0.0
                } else {
                    v as f64 / (total as f64 * width)
                }
            })
            .collect::<Vec<f64>>()
    };
    (dens(&h.genuine), dens(&h.impostor))
}

/// Draws the genuine vs impostor densities over [-1, 1] with a dashed EER-threshold line.
///
/// # Errors
/// When the PNG cannot be written.
pub fn histogram_png(h: &PairHistogram, eer_threshold: Option<f64>, path: &Path) -> Result<()> {
    let (g, i) = densities(h);
    let top = g.iter().chain(&i).copied().fold(0.0f64, f64::max).max(1e-9) * 1.08;
    let mut plot = Plot::new(Scale::Linear(-1.0, 1.0), Scale::Linear(0.0, top))?;
    let xticks: Vec<(f64, String)> = (0..=8)
        .map(|k| {
            let v = -1.0 + 0.25 * k as f64;
            (v, fmt_tick(v))
        })
        .collect();
    let step = nice_step(top, 5.0);
    let yticks: Vec<(f64, String)> = (0..)
        .map(|k| k as f64 * step)
        .take_while(|&v| v <= top)
        .map(|v| (v, fmt_tick(v)))
        .collect();
    plot.axes(
        &xticks,
        &yticks,
        ["SCORE DENSITY", "COSINE SIMILARITY", "DENSITY"],
    );
    let edges = h.bin_edges();
    for (dens, rgb) in [(&i, IMPOSTOR), (&g, GENUINE)] {
        let mut pts = vec![plot.px(-1.0, 0.0)];
        for (k, &d) in dens.iter().enumerate() {
            pts.push(plot.px(edges[k], d));
            pts.push(plot.px(edges[k + 1], d));
        }
        pts.push(plot.px(1.0, 0.0));
        plot.fill(&pts, rgb, 70);
        plot.line(&pts, rgb, 2.0, false);
    }
    let mut legend = vec![
        (GENUINE, "GENUINE".to_owned()),
        (IMPOSTOR, "IMPOSTOR".to_owned()),
    ];
    if let Some(t) = eer_threshold {
        let (x, y0) = plot.px(t, 0.0);
        let (_, y1) = plot.px(t, top);
        plot.line(&[(x, y0), (x, y1)], INK, 1.5, true);
        legend.push((INK, format!("EER THR {t:.3}")));
    }
    let entries: Vec<([u8; 3], &str)> = legend.iter().map(|(c, s)| (*c, s.as_str())).collect();
    plot.legend(&entries);
    plot.save(path)
}

/// Smallest power of ten at or below the smallest positive value (at least 1e-6).
fn log_floor(values: &[f64]) -> f64 {
    let min = values
        .iter()
        .copied()
        .filter(|&v| v > 0.0)
        .fold(1.0f64, f64::min);
    10f64.powf(min.log10().floor()).clamp(1e-6, 0.1)
}

fn decade_ticks(lo: f64) -> Vec<(f64, String)> {
    let k = -lo.log10().round() as i32;
    (0..=k)
        .map(|e| {
            let v = 10f64.powi(-e);
            let label = if e == 0 {
                "1".to_owned()
            } else if e <= 2 {
                fmt_tick(v)
            } else {
                format!("1E-{e}")
            };
            (v, label)
        })
        .collect()
}

/// Pixel polyline of a curve, dropping points that move less than half a pixel.
fn decimate(plot: &Plot, xs: &[f64], ys: &[f64]) -> Vec<(f32, f32)> {
    let mut out: Vec<(f32, f32)> = Vec::new();
    for (&x, &y) in xs.iter().zip(ys) {
        let p = plot.px(x, y);
        match out.last() {
            Some(&(lx, ly)) if (lx - p.0).abs() < 0.5 && (ly - p.1).abs() < 0.5 => {}
            _ => out.push(p),
        }
    }
    if let (Some(&x), Some(&y)) = (xs.last(), ys.last()) {
        out.push(plot.px(x, y));
    }
    out
}

/// ROC: true accept rate (1 − FNMR) over FMR on a log axis, with the EER point.
///
/// # Errors
/// When the PNG cannot be written.
pub fn roc_png(roc: &RocCurve, eer: Option<f64>, path: &Path) -> Result<()> {
    let lo = log_floor(&roc.fmr);
    let mut plot = Plot::new(Scale::Log(lo, 1.0), Scale::Linear(0.0, 1.0))?;
    let yticks: Vec<(f64, String)> = (0..=5)
        .map(|k| (k as f64 * 0.2, fmt_tick(k as f64 * 0.2)))
        .collect();
    plot.axes(&decade_ticks(lo), &yticks, ["ROC", "FMR", "TAR = 1 - FNMR"]);
    let tar: Vec<f64> = roc.fnmr.iter().map(|f| 1.0 - f).collect();
    let pts = decimate(&plot, &roc.fmr, &tar);
    plot.line(&pts, CURVE, 2.0, false);
    let mut legend = vec![(CURVE, "ROC".to_owned())];
    if let Some(e) = eer {
        let (x, y) = plot.px(e, 1.0 - e);
        plot.rect(x - 4.0, y - 4.0, 8.0, 8.0, IMPOSTOR);
        legend.push((IMPOSTOR, format!("EER {:.2}%", e * 100.0)));
    }
    let entries: Vec<([u8; 3], &str)> = legend.iter().map(|(c, s)| (*c, s.as_str())).collect();
    plot.legend(&entries);
    plot.save(path)
}

/// DET: FNMR over FMR, both on log axes, with the FMR = FNMR diagonal dashed.
///
/// # Errors
/// When the PNG cannot be written.
pub fn det_png(roc: &RocCurve, eer: Option<f64>, path: &Path) -> Result<()> {
    let lo = log_floor(&roc.fmr).min(log_floor(&roc.fnmr));
    let mut plot = Plot::new(Scale::Log(lo, 1.0), Scale::Log(lo, 1.0))?;
    let ticks = decade_ticks(lo);
    plot.axes(&ticks, &ticks, ["DET", "FMR", "FNMR"]);
    let diag = [plot.px(lo, lo), plot.px(1.0, 1.0)];
    plot.line(&diag, GRID.map(|c| c - 60), 1.0, true);
    let pts = decimate(&plot, &roc.fmr, &roc.fnmr);
    plot.line(&pts, CURVE, 2.0, false);
    let mut legend = vec![(CURVE, "DET".to_owned())];
    if let Some(e) = eer {
        let (x, y) = plot.px(e, e);
        plot.rect(x - 4.0, y - 4.0, 8.0, 8.0, IMPOSTOR);
        legend.push((IMPOSTOR, format!("EER {:.2}%", e * 100.0)));
    }
    let entries: Vec<([u8; 3], &str)> = legend.iter().map(|(c, s)| (*c, s.as_str())).collect();
    plot.legend(&entries);
    plot.save(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::metrics::roc_curve;

    #[test]
    fn ticks_scales_and_densities() {
        assert_eq!(fmt_tick(0.5), "0.5");
        assert_eq!(fmt_tick(-1.0), "-1");
        assert_eq!(fmt_tick(-0.0), "0");
        assert_eq!(nice_step(9.0, 5.0), 2.0);
        assert_eq!(nice_step(7.3, 5.0), 1.0);
        assert_eq!(nice_step(0.9, 5.0), 0.2);
        assert_eq!(Scale::Log(1e-3, 1.0).frac(1e-2), 1.0 / 3.0);
        assert_eq!(Scale::Log(1e-3, 1.0).frac(0.0), 0.0);
        assert_eq!(log_floor(&[0.0, 0.004, 1.0]), 1e-3);
        let ticks = decade_ticks(1e-4);
        assert_eq!(ticks.len(), 5);
        assert_eq!(ticks[3].1, "1E-3");
        let mut h = PairHistogram::new(4);
        h.genuine = vec![0, 0, 1, 3];
        h.impostor = vec![2, 2, 0, 0];
        let (g, i) = densities(&h);
        assert_eq!(g, vec![0.0, 0.0, 0.5, 1.5]);
        assert_eq!(i, vec![1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn plots_are_written_as_pngs() {
        let dir = tempfile::tempdir().unwrap();
        let g = [0.6, 0.7, 0.8, 0.4];
        let i = [0.1, 0.2, -0.1, 0.45, 0.0];
        let mut h = PairHistogram::new(100);
        g.iter().for_each(|&s| h.add(s as f32, true));
        i.iter().for_each(|&s| h.add(s as f32, false));
        let roc = roc_curve(&g, &i);
        histogram_png(&h, Some(0.42), &dir.path().join("h.png")).unwrap();
        roc_png(&roc, Some(0.1), &dir.path().join("r.png")).unwrap();
        det_png(&roc, None, &dir.path().join("d.png")).unwrap();
        for f in ["h.png", "r.png", "d.png"] {
            let img = image::open(dir.path().join(f)).unwrap().to_rgb8();
            assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
            // Something besides the white background was drawn in the plot area.
            let ink = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
            assert!(ink > 5000, "{f}: {ink} drawn pixels");
        }
        let e = histogram_png(&h, None, &dir.path().join("missing/h.png")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
