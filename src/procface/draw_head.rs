//! Body, neck, ears, head outline, skin shading and facial marks.

use super::canvas::{linear, mirror_x, radial, Canvas, CENTRE_X};
use super::color::Rgb;
use super::render::Scene;
use super::rng::{stream, Sample};
use tiny_skia::{Mask, Path, Point};

const CX: f32 = CENTRE_X;

/// Points the head outline passes through (closed, clockwise from the crown).
pub(crate) fn head_outline(scene: &Scene) -> Vec<(f32, f32)> {
    let h = &scene.id.head;
    let w = h.half_width;
    let (tr, jr, cr) = (h.temple_ratio, h.jaw_ratio, h.chin_ratio);
    let right = [
        (CX + w * tr * 0.72, h.crown_y + 0.025),
        (CX + w * tr, h.crown_y + 0.13),
        (CX + w * (0.99 + tr) * 0.5, h.cheek_y - 0.09),
        (CX + w, h.cheek_y),
        (CX + w * (1.0 + jr) * 0.5, (h.cheek_y + h.jaw_y) * 0.5),
        (CX + w * jr, h.jaw_y),
        (
            CX + w * (jr + cr) * 0.53,
            (h.jaw_y + h.chin_y) * 0.5 + 0.012,
        ),
        (CX + w * cr, h.chin_y - 0.01),
    ];
    let mut points = vec![(CX, h.crown_y)];
    points.extend(right);
    points.push((CX, h.chin_y));
    points.extend(right.iter().rev().map(|p| mirror_x(*p)));
    points
}

/// Path of the head outline.
pub(crate) fn head_path(canvas: &Canvas, scene: &Scene) -> Option<Path> {
    canvas
        .shape(0.0)
        .closed_through(&head_outline(scene))
        .finish()
}

/// Clothing over the shoulders.
pub(crate) fn draw_body(canvas: &mut Canvas, scene: &Scene) {
    let h = &scene.id.head;
    let neck = h.half_width * h.neck_ratio;
    let top = h.chin_y + 0.05;
    let right = [
        (CX + neck * 0.7, top + 0.09),
        (CX + neck + 0.01, top),
        (CX + neck + 0.02, top),
        (CX + 0.36, top + 0.05),
        (CX + 0.52, top + 0.16),
        (CX + 0.6, 1.3),
    ];
    let mut points: Vec<(f32, f32)> = right.iter().rev().map(|p| mirror_x(*p)).collect();
    points.extend(right);
    let path = canvas.shape(0.0).closed_spline(&points).finish();
    let cloth = Rgb::from_u8(scene.nz.clothing);
    let shader = linear(
        Point::from_xy(CX, top),
        Point::from_xy(CX, 1.05),
        &[
            (0.0, cloth.lighten(0.08), 1.0),
            (1.0, cloth.darken(0.25), 1.0),
        ],
    );
    canvas.fill_shader(path, shader, None);
    let collar = canvas
        .shape(0.0)
        .open_spline(&[mirror_x(right[1]), (CX, top + 0.13), right[1]])
        .finish();
    canvas.stroke(collar, cloth.darken(0.35), 0.6, 0.012, None);
}

/// Neck with the shadow cast by the jaw.
pub(crate) fn draw_neck(canvas: &mut Canvas, scene: &Scene) {
    let h = &scene.id.head;
    let neck = h.half_width * h.neck_ratio;
    let points = [
        (CX - neck, h.jaw_y - 0.05),
        (CX + neck, h.jaw_y - 0.05),
        (CX + neck * 1.02, 1.1),
        (CX - neck * 1.02, 1.1),
    ];
    let mut shape = canvas.shape(-0.05);
    shape.move_to(points[0]);
    for p in &points[1..] {
        shape.line_to(*p);
    }
    let path = shape.close().finish();
    let skin = scene.skin.scale(0.88);
    canvas.fill(path.clone(), skin, 1.0, None);
    let shadow = linear(
        Point::from_xy(CX, h.chin_y - 0.01),
        Point::from_xy(CX, h.chin_y + 0.07),
        &[(0.0, skin.darken(0.55), 0.75), (1.0, skin.darken(0.4), 0.0)],
    );
    canvas.fill_shader(path, shadow, None);
}

/// Both ears, drawn behind the head.
pub(crate) fn draw_ears(canvas: &mut Canvas, scene: &Scene) {
    for side in [-1.0, 1.0] {
        draw_ear(canvas, scene, side);
    }
}

fn draw_ear(canvas: &mut Canvas, scene: &Scene, side: f32) {
    let e = &scene.id.ears;
    let w = scene.id.head.half_width;
    let cy = scene.id.eyes.y + e.drop;
    let (h, p) = (e.height, e.protrusion);
    let x = |dx: f32| CX + side * (w + dx);
    let outline = [
        (x(-0.03), cy - h * 0.42),
        (x(p * 0.75), cy - h * 0.56),
        (x(p), cy - h * 0.15),
        (x(p * 0.7), cy + h * 0.3),
        (x(p * 0.15), cy + h * 0.55),
        (x(-0.03), cy + h * 0.35),
    ];
    let skin = scene.skin.mix(Rgb::new(0.8, 0.4, 0.4), 0.06);
    let path = canvas.shape(-0.06).closed_spline(&outline).finish();
    canvas.fill(path, skin.scale(0.97), 1.0, None);
    let rim = canvas
        .shape(-0.06)
        .open_spline(&[
            (x(p * 0.05), cy - h * 0.3),
            (x(p * 0.7), cy - h * 0.4),
            (x(p * 0.72), cy + h * 0.05),
            (x(p * 0.3), cy + h * 0.28),
        ])
        .finish();
    canvas.stroke(rim, skin.darken(0.45), 0.45, 0.008, None);
    let hollow = canvas
        .shape(-0.06)
        .ellipse((x(p * 0.3), cy - h * 0.02), p * 0.3 + 0.006, h * 0.2, 0.0)
        .finish();
    canvas.fill(hollow, skin.darken(0.4), 0.3, None);
}

/// Head skin fill.
pub(crate) fn draw_head(canvas: &mut Canvas, scene: &Scene, head: Option<Path>) {
    canvas.fill(head, scene.skin, 1.0, None);
}

/// Rim darkening, eye sockets, cheeks and highlights, clipped to the head.
pub(crate) fn shade_skin(canvas: &mut Canvas, scene: &Scene, head_mask: &Mask) {
    let id = scene.id;
    let skin = scene.skin;
    let w = id.head.half_width;
    let cover = |canvas: &Canvas| canvas.shape(0.0).circle((CX, 0.5), 0.8).finish();

    let centre = canvas.at(CX, (id.head.cheek_y + id.eyes.y) * 0.5, 0.0);
    let rim = radial(
        centre,
        w * 1.12,
        0.52,
        &[
            (0.0, skin, 0.0),
            (0.62, skin, 0.0),
            (1.0, skin.darken(0.45), 0.5),
        ],
    );
    canvas.fill_shader(cover(canvas), rim, Some(head_mask));

    let blush_alpha = (0.03 + 0.12 * id.skin.blush) * skin.luma().clamp(0.3, 1.0);
    for side in [-1.0, 1.0] {
        let eye_x = CX + side * id.eyes.spacing;
        let socket = canvas.at(eye_x, id.eyes.y - 0.01, -0.02);
        let socket_shade = radial(
            socket,
            id.eyes.width * 0.95,
            id.eyes.width * 0.7,
            &[(0.0, skin.darken(0.5), 0.22), (1.0, skin.darken(0.5), 0.0)],
        );
        canvas.fill_shader(cover(canvas), socket_shade, Some(head_mask));

        let cheek_y = id.head.cheek_y + 0.06 - 0.015 * scene.nz.smile.max(0.0);
        let cheek = canvas.at(CX + side * w * 0.55, cheek_y, 0.0);
        let blush = radial(
            cheek,
            0.075,
            0.06,
            &[
                (0.0, Rgb::new(0.85, 0.35, 0.35), blush_alpha),
                (1.0, Rgb::new(0.85, 0.35, 0.35), 0.0),
            ],
        );
        canvas.fill_shader(cover(canvas), blush, Some(head_mask));

        let cheekbone = canvas.at(CX + side * w * 0.6, id.head.cheek_y - 0.01, 0.0);
        let highlight = radial(
            cheekbone,
            0.06,
            0.035,
            &[(0.0, Rgb::WHITE, 0.12), (1.0, Rgb::WHITE, 0.0)],
        );
        canvas.fill_shader(cover(canvas), highlight, Some(head_mask));
    }

    let forehead = canvas.at(CX, id.hair.hairline_y + 0.07, 0.0);
    let shine = radial(
        forehead,
        w * 0.55,
        0.06,
        &[(0.0, Rgb::WHITE, 0.13), (1.0, Rgb::WHITE, 0.0)],
    );
    canvas.fill_shader(cover(canvas), shine, Some(head_mask));

    let under_lip = canvas.at(CX, id.mouth.y + id.mouth.lower + 0.018, 0.0);
    let chin_shadow = radial(
        under_lip,
        id.mouth.half_width * 0.8,
        0.014,
        &[(0.0, skin.darken(0.5), 0.2), (1.0, skin.darken(0.5), 0.0)],
    );
    canvas.fill_shader(cover(canvas), chin_shadow, Some(head_mask));
}

/// Moles and freckles.
pub(crate) fn draw_marks(canvas: &mut Canvas, scene: &Scene, head_mask: &Mask) {
    let marks = &scene.id.marks;
    let mole_colour = scene.skin.mix(Rgb::new(0.25, 0.14, 0.1), 0.7);
    for mole in &marks.moles {
        let path = canvas
            .shape(0.0)
            .circle((mole.x, mole.y), mole.radius)
            .finish();
        canvas.fill(path, mole_colour, 0.9, Some(head_mask));
    }
    if marks.freckles > 0.0 {
        draw_freckles(canvas, scene, head_mask);
    }
}

fn draw_freckles(canvas: &mut Canvas, scene: &Scene, head_mask: &Mask) {
    let id = scene.id;
    let mut rng = stream(id.marks.freckle_seed, 0, 0xF4EC);
    let count = (30.0 + 60.0 * id.marks.freckles) as usize;
    let colour = scene.skin.mix(Rgb::new(0.55, 0.3, 0.15), 0.55);
    let top = id.eyes.y + 0.04;
    let bottom = id.nose.base_y + 0.03;
    for _ in 0..count {
        let x = CX + rng.uniform(-0.2, 0.2);
        let y = rng.uniform(top, bottom) - 0.03 * (1.0 - ((x - CX) / 0.2).abs());
        let r = rng.uniform(0.003, 0.0065);
        let alpha = rng.uniform(0.25, 0.55) * id.marks.freckles;
        let path = canvas.shape(0.01).circle((x, y), r).finish();
        canvas.fill(path, colour, alpha, Some(head_mask));
    }
}

/// A scar, drawn over the brows so that it can split one.
pub(crate) fn draw_scar(canvas: &mut Canvas, scene: &Scene, head_mask: &Mask) {
    let Some(scar) = &scene.id.marks.scar else {
        return;
    };
    let [a, b, c] = scar.points;
    let path = canvas.shape(0.005).open_spline(&[a, b, c]).finish();
    let pale = scene.skin.mix(Rgb::new(0.92, 0.72, 0.7), 0.45);
    canvas.stroke(
        path.clone(),
        scene.skin.darken(0.35),
        0.35,
        scar.width * 1.7,
        Some(head_mask),
    );
    canvas.stroke(path, pale, 0.95, scar.width, Some(head_mask));
}
