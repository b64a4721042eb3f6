//! Scalp hair (back layer, cap, fringes, curtains) and facial hair.

use super::canvas::{linear, mirror_x, Canvas, CENTRE_X};
use super::color::Rgb;
use super::detmath;
use super::identity::{FacialHairStyle, HairStyle};
use super::render::Scene;
use super::rng::{stream, Sample};
use rand_chacha::ChaCha20Rng;
use tiny_skia::{Mask, Path, Point};

const CX: f32 = CENTRE_X;
/// Hair sits slightly off the skin.
const HAIR_BUMP: f32 = 0.01;

/// Derived hair geometry shared by all styles.
struct HairFrame {
    half_width: f32,
    temple: f32,
    crown: f32,
    volume: f32,
    hairline: f32,
    side_bottom: f32,
    part_x: f32,
    colour: Rgb,
}

impl HairFrame {
    fn new(scene: &Scene) -> Self {
        let id = scene.id;
        let volume = match id.hair.style {
            HairStyle::Buzz | HairStyle::Bald => 0.006,
            _ => id.hair.volume,
        };
        HairFrame {
            half_width: id.head.half_width,
            temple: id.head.half_width * id.head.temple_ratio * 1.02,
            crown: id.head.crown_y,
            volume,
            hairline: id.hair.hairline_y,
            side_bottom: id.eyes.y - 0.005,
            part_x: CX + id.hair.part * id.head.half_width * 0.5,
            colour: scene.hair,
        }
    }

    fn shadow(&self) -> Rgb {
        self.colour.darken(0.35)
    }

    fn sheen(&self) -> Rgb {
        if self.colour.luma() < 0.2 {
            self.colour.mix(Rgb::new(0.45, 0.42, 0.42), 0.5)
        } else {
            self.colour.lighten(0.3)
        }
    }

    /// Outer contour of the hair cap, right half, crown to side.
    fn outer_right(&self) -> [(f32, f32); 5] {
        let (w, v) = (self.half_width, self.volume);
        [
            (CX, self.crown - v - 0.006),
            (CX + w * 0.64 + v * 0.7, self.crown - v * 0.85),
            (CX + self.temple + v * 0.75, self.crown + 0.065),
            (CX + self.temple + v * 0.45 + 0.006, 0.29),
            (CX + w + v * 0.25 + 0.008, self.side_bottom - 0.03),
        ]
    }

    /// Hairline of the cap, right half, from the sideburn to the centre.
    fn hairline_right(&self, scene: &Scene) -> [(f32, f32); 6] {
        let h = &scene.id.hair;
        let w = self.half_width;
        [
            (CX + w * 1.0, self.side_bottom),
            (CX + w * 0.9, self.side_bottom - 0.012),
            (CX + w * 0.87, self.hairline + h.recession + 0.07),
            (CX + w * 0.72, self.hairline + h.recession),
            (CX + w * 0.3, self.hairline + 0.004),
            (CX, self.hairline + h.widow_peak),
        ]
    }

    /// Closed control polygon of the cap: outer contour then hairline.
    fn cap_outline(&self, scene: &Scene) -> Vec<(f32, f32)> {
        let outer = self.outer_right();
        let inner = self.hairline_right(scene);
        let mut points = vec![outer[0]];
        points.extend(&outer[1..]);
        points.push(inner[0]);
        points.extend(&inner[..5]);
        points.push(inner[5]);
        points.extend(inner[..5].iter().rev().map(|p| mirror_x(*p)));
        points.push(mirror_x(inner[0]));
        points.extend(outer[1..].iter().rev().map(|p| mirror_x(*p)));
        points
    }
}

fn texture_rng(scene: &Scene, layer: u64) -> ChaCha20Rng {
    stream(scene.id.hair.texture_seed, layer, 0x4A1E)
}

/// Hair behind the head and neck: long hair, curls, the bun.
pub(crate) fn draw_hair_back(canvas: &mut Canvas, scene: &Scene) {
    let f = HairFrame::new(scene);
    match scene.id.hair.style {
        HairStyle::Long | HairStyle::Bob => draw_long_back(canvas, scene, &f),
        HairStyle::Curly => draw_curly_cloud(canvas, scene, &f),
        HairStyle::Bun => draw_bun(canvas, scene, &f),
        _ => {}
    }
}

/// Hair in front of the face: cap, fringes, curtains.
pub(crate) fn draw_hair_front(canvas: &mut Canvas, scene: &Scene) {
    let f = HairFrame::new(scene);
    let style = scene.id.hair.style;
    match style {
        HairStyle::Bald => draw_bald_sides(canvas, &f),
        HairStyle::Buzz => {
            let cap = canvas
                .shape(HAIR_BUMP)
                .closed_spline(&f.cap_outline(scene))
                .finish();
            canvas.fill(cap, f.colour.mix(scene.skin, 0.25), 0.8, None);
        }
        _ => {
            draw_hair_shadow(canvas, &f.cap_outline(scene));
            let cap = draw_cap(canvas, scene, &f);
            draw_cap_strands(canvas, scene, &f, cap.as_ref());
            if style != HairStyle::Curly {
                draw_feathered_hairline(canvas, scene, &f);
            }
        }
    }
    match style {
        HairStyle::SideSwept => draw_swoop(canvas, scene, &f),
        HairStyle::Fringe => draw_fringe(canvas, scene, &f),
        HairStyle::Long | HairStyle::Bob => {
            draw_curtains(canvas, scene, &f);
            if scene.id.hair.bangs {
                draw_fringe(canvas, scene, &f);
            }
        }
        HairStyle::Curly => draw_curly_hairline(canvas, scene, &f),
        _ => {}
    }
}

/// Soft shadow that front hair casts on the skin just below it.
fn draw_hair_shadow(canvas: &mut Canvas, outline: &[(f32, f32)]) {
    let shifted: Vec<(f32, f32)> = outline.iter().map(|(x, y)| (*x, y + 0.014)).collect();
    let path = canvas.shape(0.0).closed_spline(&shifted).finish();
    canvas.fill(path, Rgb::BLACK, 0.16, None);
}

/// Short wisps across the hairline so it does not look cut out.
fn draw_feathered_hairline(canvas: &mut Canvas, scene: &Scene, f: &HairFrame) {
    let mut rng = texture_rng(scene, 9);
    let inner = f.hairline_right(scene);
    let mut line: Vec<(f32, f32)> = inner[1..].to_vec();
    line.extend(inner[1..5].iter().rev().map(|p| mirror_x(*p)));
    for pair in line.windows(2) {
        for step in 0..4 {
            let t = (step as f32 + rng.uniform(0.0, 1.0)) / 4.0;
            let x = pair[0].0 + (pair[1].0 - pair[0].0) * t;
            let y = pair[0].1 + (pair[1].1 - pair[0].1) * t;
            let lean = (x - CX) * 0.08;
            let length = rng.uniform(0.012, 0.022);
            let wisp = canvas
                .shape(HAIR_BUMP)
                .move_to((x - lean, y - length))
                .line_to((x + lean, y + length * 0.45))
                .finish();
            canvas.stroke(wisp, f.colour, 0.55, 0.006, None);
        }
    }
}

fn draw_cap(canvas: &mut Canvas, scene: &Scene, f: &HairFrame) -> Option<Path> {
    let cap = canvas
        .shape(HAIR_BUMP)
        .closed_spline(&f.cap_outline(scene))
        .finish();
    let shader = linear(
        Point::from_xy(CX, f.crown - f.volume),
        Point::from_xy(CX, f.side_bottom),
        &[
            (0.0, f.colour.lighten(0.06), 1.0),
            (1.0, f.colour.darken(0.15), 1.0),
        ],
    );
    canvas.fill_shader(cap.clone(), shader, None);
    cap
}

/// Strokes from the hairline back towards the crown.
fn draw_cap_strands(canvas: &mut Canvas, scene: &Scene, f: &HairFrame, cap: Option<&Path>) {
    let mask = canvas.mask(cap);
    let mut rng = texture_rng(scene, 1);
    let crown = (f.part_x, f.crown + 0.02);
    for i in 0..22 {
        let t = rng.uniform(-1.0, 1.0);
        let start = (
            CX + t * f.half_width * 0.95,
            f.hairline + 0.01 + 0.05 * t * t,
        );
        let end = (
            crown.0 + rng.uniform(-0.05, 0.05),
            crown.1 + rng.uniform(-0.02, 0.03),
        );
        let bulge = (
            (start.0 + end.0) * 0.5 + t * 0.06,
            (start.1 + end.1) * 0.5 - 0.02,
        );
        let path = canvas
            .shape(HAIR_BUMP)
            .open_spline(&[start, bulge, end])
            .finish();
        let (colour, alpha) = if i % 4 == 0 {
            (f.sheen(), 0.14)
        } else {
            (f.shadow(), 0.25)
        };
        canvas.stroke(path, colour, alpha, 0.008, Some(&mask));
    }
}

fn draw_bald_sides(canvas: &mut Canvas, f: &HairFrame) {
    let w = f.half_width;
    for side in [-1.0, 1.0] {
        let x = |k: f32| CX + side * w * k;
        let patch = [
            (x(1.0) + side * 0.006, 0.27),
            (x(1.02) + side * 0.008, 0.34),
            (x(1.0), f.side_bottom),
            (x(1.0), f.side_bottom),
            (x(0.9), f.side_bottom - 0.01),
            (x(0.92), 0.3),
        ];
        let path = canvas.shape(HAIR_BUMP).closed_spline(&patch).finish();
        canvas.fill(path, f.colour, 0.85, None);
    }
    let scalp = canvas.at(CX - 0.05, f.crown + 0.06, 0.0);
    let shine = super::canvas::radial(
        scalp,
        0.1,
        0.05,
        &[(0.0, Rgb::WHITE, 0.2), (1.0, Rgb::WHITE, 0.0)],
    );
    let cover = canvas
        .shape(0.0)
        .circle((CX, f.crown + 0.06), 0.12)
        .finish();
    canvas.fill_shader(cover, shine, None);
}

fn draw_long_back(canvas: &mut Canvas, scene: &Scene, f: &HairFrame) {
    let h = &scene.id.hair;
    let (w, v) = (f.half_width, f.volume);
    let bob = h.style == HairStyle::Bob;
    let flare = if bob { 0.035 } else { 0.06 };
    let right = [
        (CX + w * 0.7 + v, f.crown - v),
        (CX + f.temple + v + 0.02, f.crown + 0.08),
        (CX + w + v + 0.03, 0.45),
        (CX + w + v + flare, h.length_y - 0.08),
        (CX + w + flare * 0.6, h.length_y),
        (CX + w * 0.45, h.length_y + 0.015),
    ];
    let mut points = vec![(CX, f.crown - v - 0.01)];
    points.extend(right);
    points.extend(right.iter().rev().map(|p| mirror_x(*p)));
    let path = canvas.shape(0.0).closed_spline(&points).finish();
    canvas.fill(path, f.colour.darken(0.3), 1.0, None);
}

/// Right-side curtain control polygon (mirror for the left).
fn curtain(scene: &Scene, f: &HairFrame, side: f32) -> Vec<(f32, f32)> {
    let id = scene.id;
    let h = &id.hair;
    let (w, v) = (f.half_width, f.volume);
    let bob = h.style == HairStyle::Bob;
    let x = |k: f32| CX + side * k;
    let part_near = (f.part_x - CX) * side > 0.0;
    let top_inner = if part_near {
        f.part_x + side * 0.01
    } else {
        f.part_x - side * 0.01
    };
    let cover = if part_near { 0.8 } else { 0.7 };
    let bottom = h.length_y;
    let (outer_bottom, inner_bottom) = if bob {
        (x(w + v + 0.03), x(w * 0.93))
    } else {
        (x(w + v * 0.5 + 0.05), x(w * 0.78))
    };
    vec![
        (top_inner, f.crown + 0.03),
        (x(f.temple + v), f.crown + 0.1),
        (x(w + v + 0.012), 0.45),
        (outer_bottom, bottom - 0.06),
        (outer_bottom - side * 0.01, bottom),
        (inner_bottom, bottom - if bob { 0.0 } else { 0.03 }),
        (x(w * 0.9), id.head.jaw_y.min(bottom - 0.05)),
        (x(w * 0.9), id.eyes.y + 0.02),
        (x(w * cover), f.hairline + 0.05),
        (top_inner, f.hairline + 0.005),
    ]
}

fn draw_curtains(canvas: &mut Canvas, scene: &Scene, f: &HairFrame) {
    let mut rng = texture_rng(scene, 2);
    for side in [-1.0, 1.0] {
        let points = curtain(scene, f, side);
        let path = canvas.shape(HAIR_BUMP).closed_spline(&points).finish();
        let mask = canvas.mask(path.as_ref());
        canvas.fill(path, f.colour, 1.0, None);
        for i in 0..10 {
            let t = rng.uniform(0.0, 1.0);
            let top = (points[0].0 + side * t * 0.2, f.crown + 0.04);
            let mid = (CX + side * (f.half_width * (0.85 + 0.25 * t)), 0.45);
            let bottom = (
                CX + side * (f.half_width * (0.8 + 0.3 * t)),
                scene.id.hair.length_y,
            );
            let path = canvas
                .shape(HAIR_BUMP)
                .open_spline(&[top, mid, bottom])
                .finish();
            let (colour, alpha) = if i % 3 == 0 {
                (f.sheen(), 0.3)
            } else {
                (f.shadow(), 0.4)
            };
            canvas.stroke(path, colour, alpha, 0.005, Some(&mask));
        }
    }
}

fn draw_fringe(canvas: &mut Canvas, scene: &Scene, f: &HairFrame) {
    let mut rng = texture_rng(scene, 3);
    let w = f.half_width;
    let y = scene.id.hair.fringe_y;
    let mut points = vec![
        (CX - w * 0.96, f.hairline + 0.03),
        (CX - w * 0.6, f.crown + 0.03),
        (CX + w * 0.6, f.crown + 0.03),
        (CX + w * 0.96, f.hairline + 0.03),
        (CX + w * 0.94, y + 0.03),
    ];
    let tips = 7;
    for k in 0..=tips {
        let t = 1.0 - 2.0 * k as f32 / tips as f32;
        let curve = 0.02 * t * t;
        let dy = if k % 2 == 0 { 0.01 } else { -0.006 };
        points.push((
            CX + t * w * 0.86,
            y + curve + dy + rng.uniform(-0.004, 0.004),
        ));
    }
    points.push((CX - w * 0.94, y + 0.03));
    let path = canvas
        .shape(HAIR_BUMP + 0.005)
        .closed_spline(&points)
        .finish();
    let mask = canvas.mask(path.as_ref());
    canvas.fill(path, f.colour, 1.0, None);
    for i in 0..16 {
        let t = rng.uniform(-0.95, 0.95);
        let top = (CX + t * w * 0.7, f.crown + 0.05);
        let bottom = (CX + t * w * 0.9, y + 0.02);
        let path = canvas
            .shape(HAIR_BUMP + 0.005)
            .move_to(top)
            .line_to(bottom)
            .finish();
        let (colour, alpha) = if i % 3 == 0 {
            (f.sheen(), 0.25)
        } else {
            (f.shadow(), 0.35)
        };
        canvas.stroke(path, colour, alpha, 0.005, Some(&mask));
    }
}

fn draw_swoop(canvas: &mut Canvas, scene: &Scene, f: &HairFrame) {
    let side = if scene.id.hair.part >= 0.0 { 1.0 } else { -1.0 };
    let w = f.half_width;
    let x = |k: f32| CX + side * w * k;
    let y = scene.id.hair.fringe_y;
    let points = [
        (x(0.5), f.crown + 0.04),
        (x(0.42), f.hairline + 0.005),
        (x(0.1), f.hairline + 0.04),
        (x(-0.45), y - 0.004),
        (x(-0.9), y + 0.02),
        (x(-1.0), f.hairline + 0.02),
        (x(-0.7), f.crown + 0.02),
    ];
    let path = canvas
        .shape(HAIR_BUMP + 0.005)
        .closed_spline(&points)
        .finish();
    let mask = canvas.mask(path.as_ref());
    canvas.fill(path, f.colour.lighten(0.03), 1.0, None);
    let mut rng = texture_rng(scene, 4);
    for i in 0..12 {
        let t = rng.uniform(0.0, 1.0);
        let start = (x(0.45), f.crown + 0.03 + t * 0.06);
        let mid = (x(-0.2), f.hairline + 0.01 + t * 0.06);
        let end = (x(-0.95), y - 0.01 + t * 0.02);
        let path = canvas
            .shape(HAIR_BUMP + 0.005)
            .open_spline(&[start, mid, end])
            .finish();
        let (colour, alpha) = if i % 3 == 0 {
            (f.sheen(), 0.3)
        } else {
            (f.shadow(), 0.35)
        };
        canvas.stroke(path, colour, alpha, 0.005, Some(&mask));
    }
}

fn draw_curly_cloud(canvas: &mut Canvas, scene: &Scene, f: &HairFrame) {
    let (w, v) = (f.half_width, f.volume);
    let centre = (CX, (f.crown + scene.id.eyes.y) * 0.5);
    let (rx, ry) = (w + v * 0.8, (scene.id.eyes.y - f.crown) * 0.5 + v);
    let body = canvas
        .shape(0.0)
        .ellipse(centre, rx, ry + 0.03, 0.0)
        .finish();
    let dark = f.colour.darken(0.2);
    canvas.fill(body, dark, 1.0, None);
    let mut rng = texture_rng(scene, 5);
    let bumps = 16;
    for k in 0..=bumps {
        let angle = -0.35 + (std::f32::consts::PI + 0.7) * k as f32 / bumps as f32;
        let (s, c) = (detmath::sin(angle), detmath::cos(angle));
        let p = (centre.0 - c * rx, centre.1 - s * (ry + 0.02));
        let r = v * rng.uniform(0.4, 0.6);
        let puff = canvas.shape(0.0).circle(p, r).finish();
        canvas.fill(puff, dark, 1.0, None);
    }
}

fn draw_curly_hairline(canvas: &mut Canvas, scene: &Scene, f: &HairFrame) {
    let mut rng = texture_rng(scene, 6);
    let inner = f.hairline_right(scene);
    let mut line: Vec<(f32, f32)> = inner[1..].to_vec();
    line.extend(inner[1..5].iter().rev().map(|p| mirror_x(*p)));
    for pair in line.windows(2) {
        for step in 0..3 {
            let t = step as f32 / 3.0;
            let p = (
                pair[0].0 + (pair[1].0 - pair[0].0) * t,
                pair[0].1 + (pair[1].1 - pair[0].1) * t - 0.004,
            );
            let r = rng.uniform(0.014, 0.022);
            let puff = canvas.shape(HAIR_BUMP).circle(p, r).finish();
            canvas.fill(puff, f.colour, 1.0, None);
        }
    }
    let cap_path = canvas
        .shape(HAIR_BUMP)
        .closed_spline(&f.cap_outline(scene))
        .finish();
    let mask = canvas.mask(cap_path.as_ref());
    for i in 0..40 {
        let p = (
            CX + rng.uniform(-1.0, 1.0) * (f.half_width + f.volume),
            rng.uniform(f.crown - f.volume, f.hairline + 0.04),
        );
        let r = rng.uniform(0.008, 0.014);
        let curl = canvas
            .shape(HAIR_BUMP)
            .open_spline(&[(p.0 - r, p.1), (p.0, p.1 - r * 1.6), (p.0 + r, p.1)])
            .finish();
        let colour = if i % 2 == 0 { f.sheen() } else { f.shadow() };
        canvas.stroke(curl, colour, 0.4, 0.005, Some(&mask));
    }
}

fn draw_bun(canvas: &mut Canvas, scene: &Scene, f: &HairFrame) {
    let mut rng = texture_rng(scene, 7);
    let r = rng.uniform(0.07, 0.09);
    let centre = (CX + rng.uniform(-0.03, 0.03), f.crown - r * 0.1);
    let bun = canvas.shape(0.0).circle(centre, r).finish();
    let mask = canvas.mask(bun.as_ref());
    canvas.fill(bun, f.colour.darken(0.08), 1.0, None);
    for i in 0..6 {
        let a = i as f32 * 0.9;
        let (s, c) = (detmath::sin(a), detmath::cos(a));
        let arc = canvas
            .shape(0.0)
            .open_spline(&[
                (centre.0 - c * r * 0.8, centre.1 - s * r * 0.8),
                (centre.0 + s * r * 0.5, centre.1 - c * r * 0.5),
                (centre.0 + c * r * 0.8, centre.1 + s * r * 0.8),
            ])
            .finish();
        canvas.stroke(arc, f.shadow(), 0.4, 0.005, Some(&mask));
    }
}

/// Stubble, beard, goatee or moustache drawn *under* the lips.
pub(crate) fn draw_beard(canvas: &mut Canvas, scene: &Scene, head_mask: &Mask) {
    let style = scene.id.facial_hair.style;
    let density = scene.id.facial_hair.density;
    let colour = scene.hair.darken(0.1);
    match style {
        FacialHairStyle::Stubble => {
            let path = canvas
                .shape(0.005)
                .closed_spline(&beard_outline(scene, 0.0))
                .finish();
            let shadow = colour.mix(scene.skin, 0.45);
            canvas.stroke(path.clone(), shadow, 0.12, 0.014, Some(head_mask));
            canvas.fill(path, shadow, 0.28, Some(head_mask));
        }
        FacialHairStyle::FullBeard => {
            let fullness = scene.id.facial_hair.fullness;
            let path = canvas
                .shape(0.01)
                .closed_spline(&beard_outline(scene, fullness))
                .finish();
            let mask = canvas.mask(path.as_ref());
            canvas.stroke(path.clone(), colour, density * 0.3, 0.014, Some(head_mask));
            canvas.fill(path, colour, density * 0.9, None);
            draw_beard_texture(canvas, scene, &mask);
        }
        FacialHairStyle::Goatee => {
            let path = canvas
                .shape(0.01)
                .closed_spline(&goatee_outline(scene))
                .finish();
            canvas.fill(path, colour, density, None);
        }
        FacialHairStyle::None | FacialHairStyle::Moustache => {}
    }
}

/// Moustache drawn *over* the upper lip.
pub(crate) fn draw_moustache(canvas: &mut Canvas, scene: &Scene) {
    let style = scene.id.facial_hair.style;
    if !matches!(
        style,
        FacialHairStyle::Moustache | FacialHairStyle::Goatee | FacialHairStyle::FullBeard
    ) {
        return;
    }
    let id = scene.id;
    let m = &id.mouth;
    let lift = 0.016 * scene.nz.smile;
    let right = [
        (CX + m.half_width * 1.02, m.y + 0.004 - lift),
        (CX + m.half_width * 0.9, m.y - m.upper - 0.004 - lift),
        (CX + m.half_width * 0.4, id.nose.base_y + 0.02),
    ];
    let bottom_right = (CX + m.half_width * 0.55, m.y - m.upper * 0.55 - lift * 0.5);
    let mut points = vec![(CX, id.nose.base_y + 0.026)];
    points.extend(right.iter().rev().map(|p| mirror_x(*p)));
    points.push(mirror_x(bottom_right));
    points.push((CX, m.y - m.upper * 0.45));
    points.push(bottom_right);
    points.extend(right);
    let path = canvas.shape(0.03).closed_spline(&points).finish();
    let colour = scene.hair.darken(0.12);
    canvas.fill(path, colour, scene.id.facial_hair.density * 0.92, None);
}

fn beard_outline(scene: &Scene, fullness: f32) -> Vec<(f32, f32)> {
    let id = scene.id;
    let h = &id.head;
    let w = h.half_width;
    let m = &id.mouth;
    let right = [
        (CX + w * 1.0, id.eyes.y + 0.01),
        (CX + w * 1.03 + fullness * 0.3, h.cheek_y + 0.06),
        (
            CX + w * h.jaw_ratio + 0.012 + fullness * 0.6,
            h.jaw_y + fullness * 0.5,
        ),
        (
            CX + w * h.chin_ratio + 0.02 + fullness * 0.4,
            h.chin_y + fullness,
        ),
    ];
    let inner_right = [
        (CX + w * 0.93, id.eyes.y + 0.06),
        (CX + w * 0.78, h.cheek_y + 0.11),
        (CX + m.half_width * 1.25, id.nose.base_y + 0.045),
        (CX + 0.03, id.nose.base_y + 0.014),
    ];
    let mut points = vec![(CX, h.chin_y + 0.02 + fullness * 1.2)];
    points.extend(right.iter().rev().map(|p| mirror_x(*p)));
    points.extend(inner_right.iter().map(|p| mirror_x(*p)));
    points.extend(inner_right.iter().rev());
    points.extend(right);
    points
}

fn goatee_outline(scene: &Scene) -> Vec<(f32, f32)> {
    let id = scene.id;
    let m = &id.mouth;
    let chin = id.head.chin_y;
    let right = [
        (CX + m.half_width * 0.9, m.y + m.lower * 0.8),
        (CX + m.half_width * 0.75, chin - 0.05),
        (CX + m.half_width * 0.45, chin - 0.012),
    ];
    let mut points = vec![(CX, m.y + m.lower * 0.6)];
    points.extend(right);
    points.push((CX, chin + 0.0));
    points.extend(right.iter().rev().map(|p| mirror_x(*p)));
    points
}

fn draw_beard_texture(canvas: &mut Canvas, scene: &Scene, mask: &Mask) {
    let mut rng = texture_rng(scene, 8);
    let id = scene.id;
    let w = id.head.half_width;
    for i in 0..70 {
        let x = CX + rng.uniform(-1.0, 1.0) * w;
        let y = rng.uniform(id.mouth.y - 0.02, id.head.chin_y + 0.02);
        let len = rng.uniform(0.015, 0.03);
        let tilt = (x - CX) * 0.3;
        let path = canvas
            .shape(0.01)
            .move_to((x, y))
            .line_to((x + tilt * len * 3.0, y + len))
            .finish();
        let colour = if i % 3 == 0 {
            scene.hair.lighten(0.25)
        } else {
            scene.hair.darken(0.4)
        };
        canvas.stroke(path, colour, 0.35, 0.004, Some(mask));
    }
}
