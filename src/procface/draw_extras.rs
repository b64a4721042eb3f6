//! Backdrop and accessories (glasses, hats).

use super::canvas::{linear, mirror_x, radial, Canvas, CENTRE_X};
use super::color::Rgb;
use super::detmath;
use super::nuisance::{BackgroundStyle, GlassesStyle, HatStyle};
use super::render::Scene;
use super::rng::{stream, Sample};
use tiny_skia::Point;

const CX: f32 = CENTRE_X;
/// Glasses float in front of the eyes.
const GLASSES_BUMP: f32 = 0.03;

/// Fills the whole (flat) canvas with the backdrop.
pub(crate) fn draw_background(canvas: &mut Canvas, scene: &Scene) {
    let bg = &scene.nz.background;
    let a = Rgb::from_u8(bg.colour_a);
    let b = Rgb::from_u8(bg.colour_b);
    let (s, c) = (detmath::sin(bg.angle), detmath::cos(bg.angle));
    let start = Point::from_xy(0.5 - s * 0.6, 0.5 - c * 0.6);
    let end = Point::from_xy(0.5 + s * 0.6, 0.5 + c * 0.6);
    let gradient = linear(start, end, &[(0.0, a, 1.0), (1.0, b, 1.0)]);
    let whole = whole_frame(canvas);
    canvas.fill_shader(whole.clone(), gradient, None);
    match bg.style {
        BackgroundStyle::Gradient => {}
        BackgroundStyle::Vignette => {
            let glow = radial(
                Point::from_xy(0.5, 0.45),
                0.75,
                0.75,
                &[(0.0, a.lighten(0.15), 0.9), (1.0, b.darken(0.2), 0.9)],
            );
            canvas.fill_shader(whole, glow, None);
        }
        BackgroundStyle::Bokeh => draw_bokeh(canvas, scene, a, b),
    }
}

/// A rectangle a little larger than the frame.
fn whole_frame(canvas: &Canvas) -> Option<tiny_skia::Path> {
    canvas
        .shape(0.0)
        .move_to((-0.1, -0.1))
        .line_to((1.1, -0.1))
        .line_to((1.1, 1.1))
        .line_to((-0.1, 1.1))
        .close()
        .finish()
}

fn draw_bokeh(canvas: &mut Canvas, scene: &Scene, a: Rgb, b: Rgb) {
    let mut rng = stream(scene.nz.background.blob_seed, 0, 0xB0CE);
    let count = 3 + (rng.uniform(0.0, 5.0) as usize);
    for _ in 0..count {
        let centre = Point::from_xy(rng.uniform(-0.1, 1.1), rng.uniform(-0.1, 0.8));
        let r = rng.uniform(0.08, 0.25);
        let tint = if rng.chance(0.5) {
            a.lighten(rng.uniform(0.1, 0.4))
        } else {
            b.mix(Rgb::from_hsv(rng.uniform(0.0, 1.0), 0.4, 0.8), 0.3)
        };
        let glow = radial(
            centre,
            r,
            r,
            &[(0.0, tint, 0.4), (0.7, tint, 0.25), (1.0, tint, 0.0)],
        );
        let blob = canvas.shape(0.0).circle((centre.x, centre.y), r).finish();
        canvas.fill_shader(blob, glow, None);
    }
}

/// Glasses over the eyes, with arms running to the ears.
pub(crate) fn draw_glasses(canvas: &mut Canvas, scene: &Scene) {
    let Some(glasses) = &scene.nz.glasses else {
        return;
    };
    let id = scene.id;
    let ew = id.eyes.width;
    let frame = Rgb::from_u8(glasses.frame);
    let width = glasses.thickness;
    let (rx, ry) = match glasses.style {
        GlassesStyle::Round => (ew * 0.72, ew * 0.62),
        GlassesStyle::Rectangular => (ew * 0.8, ew * 0.5),
        GlassesStyle::Aviator => (ew * 0.8, ew * 0.66),
    };
    let lens_centre_y = id.eyes.y + ry * 0.12;
    for side in [-1.0, 1.0] {
        let centre = (CX + side * id.eyes.spacing, lens_centre_y);
        let lens = lens_outline(glasses.style, centre, rx, ry, side);
        let path = canvas.shape(GLASSES_BUMP).closed_spline(&lens).finish();
        let tint = Rgb::new(0.1, 0.12, 0.16);
        canvas.fill(path.clone(), tint, 0.06 + 0.85 * glasses.tint, None);
        canvas.stroke(path, frame, 1.0, width, None);
        let glare = canvas
            .shape(GLASSES_BUMP)
            .move_to((centre.0 - rx * 0.5, centre.1 + ry * 0.1))
            .line_to((centre.0 - rx * 0.05, centre.1 - ry * 0.55))
            .finish();
        canvas.stroke(glare, Rgb::WHITE, 0.18, ew * 0.12, None);
        let arm = canvas
            .shape(0.0)
            .move_to((centre.0 + side * rx * 0.98, centre.1 - ry * 0.45))
            .line_to((CX + side * id.head.half_width * 1.01, id.eyes.y - 0.005))
            .finish();
        canvas.stroke(arm, frame, 1.0, width * 0.8, None);
    }
    let inner = id.eyes.spacing - rx * 0.95;
    let bridge = canvas
        .shape(GLASSES_BUMP + 0.01)
        .move_to((CX - inner, lens_centre_y - ry * 0.35))
        .quad_to(
            (CX, lens_centre_y - ry * 0.75),
            (CX + inner, lens_centre_y - ry * 0.35),
        )
        .finish();
    canvas.stroke(bridge, frame, 1.0, width, None);
}

/// Control polygon of one lens; `side` is −1 (left) or 1 (right).
fn lens_outline(
    style: GlassesStyle,
    centre: (f32, f32),
    rx: f32,
    ry: f32,
    side: f32,
) -> Vec<(f32, f32)> {
    let at = |u: f32, v: f32| (centre.0 + side * u * rx, centre.1 + v * ry);
    match style {
        GlassesStyle::Round => (0..8)
            .map(|k| {
                let a = k as f32 * std::f32::consts::FRAC_PI_4;
                at(1.08 * detmath::cos(a), 1.08 * detmath::sin(a))
            })
            .collect(),
        GlassesStyle::Rectangular => {
            vec![at(-1.0, -1.0), at(1.0, -1.0), at(1.0, 1.0), at(-1.0, 1.0)]
        }
        GlassesStyle::Aviator => vec![
            at(-1.0, -1.0),
            at(1.05, -1.05),
            at(1.0, 0.6),
            at(0.3, 1.3),
            at(-0.9, 0.8),
        ],
    }
}

/// A hat covering the top of the head.
pub(crate) fn draw_hat(canvas: &mut Canvas, scene: &Scene) {
    let Some(hat) = &scene.nz.hat else {
        return;
    };
    let id = scene.id;
    let colour = Rgb::from_u8(hat.colour);
    let w = id.head.half_width;
    let v = id.hair.volume.min(0.06);
    let brim_y = id.hair.hairline_y + 0.05;
    let crown_top = id.head.crown_y - v - 0.05;
    let right = [
        (CX + w * 0.7, crown_top + 0.01),
        (CX + w + v + 0.03, id.head.crown_y + 0.06),
        (CX + w + v + 0.035, brim_y + 0.02),
    ];
    let mut points = vec![(CX, crown_top)];
    points.extend(right);
    points.push((CX, brim_y + 0.01));
    points.extend(right.iter().rev().map(|p| mirror_x(*p)));
    let dome = canvas.shape(0.02).closed_spline(&points).finish();
    let shade = linear(
        Point::from_xy(CX, crown_top),
        Point::from_xy(CX, brim_y),
        &[
            (0.0, colour.lighten(0.15), 1.0),
            (1.0, colour.darken(0.3), 1.0),
        ],
    );
    canvas.fill_shader(dome, shade, None);
    match hat.style {
        HatStyle::Beanie => draw_beanie_band(canvas, scene, colour, brim_y),
        HatStyle::Cap => draw_cap_brim(canvas, scene, colour, brim_y),
    }
}

fn draw_beanie_band(canvas: &mut Canvas, scene: &Scene, colour: Rgb, brim_y: f32) {
    let w = scene.id.head.half_width;
    let v = scene.id.hair.volume.min(0.06);
    let top = brim_y - 0.065;
    let band = [
        (CX - w - v - 0.035, top),
        (CX, top - 0.01),
        (CX + w + v + 0.035, top),
        (CX + w + v + 0.035, brim_y + 0.025),
        (CX + w + v + 0.035, brim_y + 0.025),
        (CX, brim_y + 0.015),
        (CX - w - v - 0.035, brim_y + 0.025),
        (CX - w - v - 0.035, brim_y + 0.025),
    ];
    let path = canvas.shape(0.025).closed_spline(&band).finish();
    let mask = canvas.mask(path.as_ref());
    canvas.fill(path, colour.darken(0.22), 1.0, None);
    for k in 0..15 {
        let x = CX - w - 0.02 + (2.0 * w + 0.04) * k as f32 / 14.0;
        let rib = canvas
            .shape(0.025)
            .move_to((x, top - 0.02))
            .line_to((x, brim_y + 0.03))
            .finish();
        canvas.stroke(rib, colour.darken(0.5), 0.55, 0.005, Some(&mask));
    }
}

fn draw_cap_brim(canvas: &mut Canvas, scene: &Scene, colour: Rgb, brim_y: f32) {
    let w = scene.id.head.half_width;
    let seam = canvas
        .shape(0.03)
        .move_to((CX, scene.id.head.crown_y - 0.06))
        .line_to((CX, brim_y))
        .finish();
    canvas.stroke(seam, colour.darken(0.45), 0.5, 0.005, None);
    let shadow = canvas
        .shape(0.0)
        .ellipse((CX, brim_y + 0.05), w * 0.9, 0.05, 0.0)
        .finish();
    canvas.fill(shadow, Rgb::BLACK, 0.25, None);
    let brim = [
        (CX - w * 0.98, brim_y + 0.005),
        (CX - w * 0.98, brim_y + 0.005),
        (CX, brim_y - 0.01),
        (CX + w * 0.98, brim_y + 0.005),
        (CX + w * 0.98, brim_y + 0.005),
        (CX + w * 0.75, brim_y + 0.07),
        (CX, brim_y + 0.095),
        (CX - w * 0.75, brim_y + 0.07),
    ];
    let path = canvas.shape(0.1).closed_spline(&brim).finish();
    let shade = linear(
        canvas.at(CX, brim_y, 0.1),
        canvas.at(CX, brim_y + 0.09, 0.1),
        &[
            (0.0, colour.darken(0.35), 1.0),
            (1.0, colour.lighten(0.05), 1.0),
        ],
    );
    canvas.fill_shader(path.clone(), shade, None);
    canvas.stroke(path, colour.darken(0.5), 0.6, 0.005, None);
}
