//! Eyes, eyebrows, nose and mouth.

use super::canvas::{radial, Canvas, CENTRE_X};
use super::color::Rgb;
use super::render::Scene;
use tiny_skia::Mask;

const CX: f32 = CENTRE_X;
/// Eyes sit slightly inside the face surface.
const EYE_BUMP: f32 = -0.015;
/// Brows sit on the brow ridge.
const BROW_BUMP: f32 = 0.01;
/// Lips are slightly raised.
const LIP_BUMP: f32 = 0.02;

/// Geometry of one open eye in frame units.
struct EyeFrame {
    side: f32,
    centre: (f32, f32),
    width: f32,
    height: f32,
    tilt: f32,
    peak: f32,
}

impl EyeFrame {
    /// Frame position of the eye-local point `(u, v)`; `u` points outwards.
    fn at(&self, u: f32, v: f32) -> (f32, f32) {
        (self.centre.0 + self.side * u, self.centre.1 + v)
    }
    fn inner(&self) -> (f32, f32) {
        self.at(-self.width * 0.5, self.tilt * self.width * 0.5)
    }
    fn outer(&self) -> (f32, f32) {
        self.at(self.width * 0.5, -self.tilt * self.width * 0.5)
    }
    fn upper_control(&self) -> (f32, f32) {
        self.at(self.peak * self.width * 0.3, -self.height * 1.12)
    }
    fn lower_control(&self) -> (f32, f32) {
        self.at(
            self.peak * self.width * 0.1 + self.width * 0.06,
            self.height * 0.88,
        )
    }
}

/// Effective openness after expression (broad smiles narrow the eyes).
fn eye_openness(scene: &Scene) -> f32 {
    let squint = 0.3 * (scene.nz.smile - 0.4).max(0.0);
    (scene.nz.eye_open - squint).max(0.0)
}

/// Both eyes.
pub(crate) fn draw_eyes(canvas: &mut Canvas, scene: &Scene) {
    for side in [-1.0, 1.0] {
        let e = &scene.id.eyes;
        let eye = EyeFrame {
            side,
            centre: (CX + side * e.spacing, e.y),
            width: e.width,
            height: e.width * e.height_ratio * eye_openness(scene),
            tilt: e.tilt,
            peak: e.lid_peak,
        };
        if eye_openness(scene) < 0.25 {
            draw_closed_eye(canvas, scene, &eye);
        } else {
            draw_open_eye(canvas, scene, &eye);
        }
    }
}

fn lash_colour(scene: &Scene) -> Rgb {
    Rgb::from_u8(scene.id.brows.colour).mix(Rgb::new(0.06, 0.04, 0.04), 0.65)
}

fn draw_open_eye(canvas: &mut Canvas, scene: &Scene, eye: &EyeFrame) {
    let e = &scene.id.eyes;
    let almond = canvas
        .shape(EYE_BUMP)
        .move_to(eye.inner())
        .quad_to(eye.upper_control(), eye.outer())
        .quad_to(eye.lower_control(), eye.inner())
        .close()
        .finish();
    let mask = canvas.mask(almond.as_ref());
    let white = Rgb::new(0.93, 0.9, 0.87).mix(scene.skin, 0.12);
    canvas.fill(almond, white, 1.0, None);
    draw_iris(canvas, scene, eye, &mask);

    let upper = canvas
        .shape(EYE_BUMP)
        .move_to(eye.inner())
        .quad_to(eye.upper_control(), eye.outer())
        .finish();
    canvas.stroke(
        upper.clone(),
        Rgb::BLACK,
        0.28,
        eye.height * 0.7,
        Some(&mask),
    );
    canvas.stroke(upper, lash_colour(scene), 0.95, e.lash, None);
    let wing_end = eye.at(
        eye.width * 0.6,
        -eye.tilt * eye.width * 0.5 - eye.width * 0.07,
    );
    let wing = canvas
        .shape(EYE_BUMP)
        .move_to(eye.outer())
        .line_to(wing_end)
        .finish();
    canvas.stroke(wing, lash_colour(scene), 0.8, e.lash * 0.7, None);

    let lower = canvas
        .shape(EYE_BUMP)
        .move_to(eye.outer())
        .quad_to(eye.lower_control(), eye.inner())
        .finish();
    canvas.stroke(lower, scene.skin.darken(0.4), 0.5, e.lash * 0.45, None);
    draw_crease(canvas, scene, eye);
}

fn draw_iris(canvas: &mut Canvas, scene: &Scene, eye: &EyeFrame, mask: &Mask) {
    let e = &scene.id.eyes;
    let (gx, gy) = scene.nz.gaze;
    let r = e.width * e.iris_ratio * 0.5;
    let centre = eye.at(
        gx * eye.side * e.width * 0.12,
        gy * e.width * 0.05 + eye.height * 0.08,
    );
    let iris = Rgb::from_u8(e.iris);
    let screen = canvas.at(centre.0, centre.1, EYE_BUMP);
    let shader = radial(
        screen,
        r,
        r,
        &[
            (0.0, iris.lighten(0.25), 1.0),
            (0.75, iris, 1.0),
            (1.0, iris.darken(0.55), 1.0),
        ],
    );
    let disc = canvas.shape(EYE_BUMP).circle(centre, r).finish();
    canvas.fill_shader(disc, shader, Some(mask));
    let pupil = canvas.shape(EYE_BUMP).circle(centre, r * 0.42).finish();
    canvas.fill(pupil, Rgb::new(0.04, 0.03, 0.03), 1.0, Some(mask));
    let (lx, ly) = scene.light;
    let glint_centre = (centre.0 + lx * r * 0.45, centre.1 + ly * r * 0.45);
    let glint = canvas
        .shape(EYE_BUMP)
        .circle(glint_centre, r * 0.22)
        .finish();
    canvas.fill(glint, Rgb::WHITE, 0.85, Some(mask));
}

fn draw_crease(canvas: &mut Canvas, scene: &Scene, eye: &EyeFrame) {
    let e = &scene.id.eyes;
    let lift = eye.width * (0.12 + 0.08 * e.crease);
    let start = eye.at(-eye.width * 0.38, eye.tilt * eye.width * 0.3 - lift * 0.5);
    let end = eye.at(eye.width * 0.46, -eye.tilt * eye.width * 0.5 - lift * 0.8);
    let control = eye.at(eye.peak * eye.width * 0.3, -eye.height * 1.12 - lift * 1.2);
    let path = canvas
        .shape(EYE_BUMP)
        .move_to(start)
        .quad_to(control, end)
        .finish();
    canvas.stroke(
        path,
        scene.skin.darken(0.45),
        0.12 + 0.4 * e.crease,
        e.lash * 0.5,
        None,
    );
}

fn draw_closed_eye(canvas: &mut Canvas, scene: &Scene, eye: &EyeFrame) {
    let e = &scene.id.eyes;
    let control = eye.at(0.0, e.width * 0.12);
    let lid = canvas
        .shape(EYE_BUMP)
        .move_to(eye.inner())
        .quad_to(control, eye.outer())
        .finish();
    canvas.stroke(lid, lash_colour(scene), 0.9, e.lash, None);
    draw_crease(canvas, scene, eye);
}

/// Both eyebrows.
pub(crate) fn draw_brows(canvas: &mut Canvas, scene: &Scene) {
    for side in [-1.0, 1.0] {
        draw_brow(canvas, scene, side);
    }
}

fn draw_brow(canvas: &mut Canvas, scene: &Scene, side: f32) {
    let id = scene.id;
    let b = &id.brows;
    let raise = scene.nz.brow_raise;
    let base_y = id.eyes.y - b.gap - 0.012 * raise;
    let length = id.eyes.width * b.length;
    let inner_x = id.eyes.spacing - id.eyes.width * 0.58;
    let arch = b.arch + 0.008 * raise.max(0.0);
    let frown = 0.008 * (-raise).max(0.0);
    let at = |t: f32, dy: f32| (CX + side * (inner_x + t * length), base_y + dy);
    let half = b.thickness * 0.5;
    let outline = [
        at(0.0, half + frown),
        at(0.0, -half + frown),
        at(0.55, -arch - half * 1.1),
        at(1.0, -b.slant - arch * 0.3),
        at(1.0, -b.slant - arch * 0.3),
        at(0.55, -arch + half * 0.8),
        at(0.0, half + frown),
    ];
    let path = canvas.shape(BROW_BUMP).closed_spline(&outline).finish();
    canvas.fill(path, Rgb::from_u8(b.colour), 0.92, None);
}

/// Nose: bridge shading, tip highlight, wings and nostrils.
pub(crate) fn draw_nose(canvas: &mut Canvas, scene: &Scene) {
    let id = scene.id;
    let n = &id.nose;
    let base = n.base_y;
    let nw = n.half_width;
    let shade = scene.skin.darken(0.45);
    let dark_side = if scene.light.0 > 0.0 { -1.0 } else { 1.0 };
    for side in [-1.0, 1.0] {
        let strength = if side == dark_side { 0.16 } else { 0.05 };
        let bridge = canvas
            .shape(0.03)
            .open_spline(&[
                (CX + side * 0.022, id.eyes.y + 0.04),
                (CX + side * 0.026, (id.eyes.y + base) * 0.5 + 0.02),
                (CX + side * nw * 0.8, base - 0.03),
            ])
            .finish();
        canvas.stroke(bridge, shade, strength * n.bridge, 0.016, None);
    }

    let under = canvas.at(CX, base + 0.016, 0.02);
    let under_shadow = radial(
        under,
        nw * 1.1,
        0.012,
        &[(0.0, shade, 0.22), (1.0, shade, 0.0)],
    );
    let cover = canvas.shape(0.0).circle((CX, base), 0.08).finish();
    canvas.fill_shader(cover, under_shadow, None);

    let tip_r = 0.012 + 0.01 * n.tip;
    let tip_path = canvas
        .shape(0.07)
        .circle((CX, base - 0.022), tip_r)
        .finish();
    let tip_centre = canvas.at(CX, base - 0.026, 0.07);
    let tip = radial(
        tip_centre,
        tip_r,
        tip_r,
        &[(0.0, Rgb::WHITE, 0.2), (1.0, Rgb::WHITE, 0.0)],
    );
    canvas.fill_shader(tip_path, tip, None);

    for side in [-1.0, 1.0] {
        let wing = canvas
            .shape(0.045)
            .open_spline(&[
                (CX + side * nw * 0.75, base - 0.03),
                (CX + side * nw * 1.25, base - 0.004),
                (CX + side * nw * 0.55, base + 0.007),
            ])
            .finish();
        canvas.stroke(wing, scene.skin.darken(0.4), 0.5, 0.007, None);
        let nostril = canvas
            .shape(0.05)
            .ellipse(
                (CX + side * nw * 0.42, base + 0.002),
                nw * 0.3,
                0.0065,
                side * 0.35,
            )
            .finish();
        canvas.fill(nostril, scene.skin.darken(0.65), 0.7, None);
    }
    let columella = canvas
        .shape(0.06)
        .open_spline(&[
            (CX - nw * 0.3, base + 0.001),
            (CX, base + 0.012 + 0.006 * n.tip),
            (CX + nw * 0.3, base + 0.001),
        ])
        .finish();
    canvas.stroke(columella, scene.skin.darken(0.35), 0.3, 0.006, None);
}

/// Mouth shape for the current expression.
struct MouthFrame {
    half_width: f32,
    corner_y: f32,
    line_y: f32,
    opening: f32,
}

fn mouth_frame(scene: &Scene) -> MouthFrame {
    let m = &scene.id.mouth;
    let smile = scene.nz.smile;
    MouthFrame {
        half_width: m.half_width * (1.0 + 0.12 * smile.max(0.0)),
        corner_y: m.y - m.corner_lift - 0.02 * smile,
        line_y: m.y + 0.006 * smile,
        opening: ((smile - 0.55) / 0.45).clamp(0.0, 1.0) * 0.03,
    }
}

/// Lips, the lip line and, for broad smiles, the teeth.
pub(crate) fn draw_mouth(canvas: &mut Canvas, scene: &Scene) {
    let m = &scene.id.mouth;
    let f = mouth_frame(scene);
    let lips = Rgb::from_u8(scene.id.skin.lips);
    let left = (CX - f.half_width, f.corner_y);
    let right = (CX + f.half_width, f.corner_y);
    let top_gap = f.line_y - f.opening * 0.3;
    let bottom_gap = f.line_y + f.opening * 0.7;
    let gap_ctrl = |y: f32| 2.0 * y - f.corner_y;

    draw_smile_folds(canvas, scene, &f);
    if f.opening > 0.0 {
        draw_teeth(canvas, &f, top_gap, bottom_gap);
    }

    let bow_dip = m.y - m.upper * (1.0 - 0.35 * m.bow);
    let gap_at = |y: f32| f.corner_y + (y - f.corner_y) * 0.75;
    let upper = [
        left,
        (CX - f.half_width * 0.62, m.y - m.upper * 0.75),
        (CX - f.half_width * 0.22, m.y - m.upper),
        (CX, bow_dip),
        (CX + f.half_width * 0.22, m.y - m.upper),
        (CX + f.half_width * 0.62, m.y - m.upper * 0.75),
        right,
        right,
        (CX + f.half_width * 0.5, gap_at(top_gap)),
        (CX, top_gap),
        (CX - f.half_width * 0.5, gap_at(top_gap)),
        left,
    ];
    let upper_path = canvas.shape(LIP_BUMP).closed_through(&upper).finish();
    canvas.fill(upper_path, lips.darken(0.1), 1.0, None);

    let lower = [
        left,
        (CX - f.half_width * 0.5, gap_at(bottom_gap)),
        (CX, bottom_gap),
        (CX + f.half_width * 0.5, gap_at(bottom_gap)),
        right,
        right,
        (CX + f.half_width * 0.55, m.y + m.lower * 0.85),
        (CX, m.y + m.lower),
        (CX - f.half_width * 0.55, m.y + m.lower * 0.85),
        left,
    ];
    let lower_path = canvas.shape(LIP_BUMP).closed_through(&lower).finish();
    canvas.fill(lower_path, lips, 1.0, None);
    let gloss = canvas
        .shape(LIP_BUMP)
        .ellipse(
            (CX, m.y + m.lower * 0.55),
            f.half_width * 0.35,
            m.lower * 0.22,
            0.0,
        )
        .finish();
    canvas.fill(gloss, Rgb::WHITE, 0.14, None);

    if f.opening == 0.0 {
        let line = canvas
            .shape(LIP_BUMP)
            .move_to(left)
            .quad_to((CX, gap_ctrl(f.line_y)), right)
            .finish();
        canvas.stroke(line, lips.darken(0.6), 0.85, 0.006, None);
    }
}

fn draw_teeth(canvas: &mut Canvas, f: &MouthFrame, top: f32, bottom: f32) {
    let left = (CX - f.half_width * 0.98, f.corner_y);
    let right = (CX + f.half_width * 0.98, f.corner_y);
    let gap = canvas
        .shape(LIP_BUMP)
        .move_to(left)
        .quad_to((CX, 2.0 * top - f.corner_y), right)
        .quad_to((CX, 2.0 * bottom - f.corner_y), left)
        .close()
        .finish();
    let mask = canvas.mask(gap.as_ref());
    canvas.fill(gap, Rgb::new(0.36, 0.14, 0.15), 1.0, None);
    let teeth_bottom = top + (bottom - top) * 0.72;
    let teeth = canvas
        .shape(LIP_BUMP)
        .move_to((left.0, f.corner_y - 0.01))
        .quad_to(
            (CX, 2.0 * top - f.corner_y - 0.02),
            (right.0, f.corner_y - 0.01),
        )
        .line_to((right.0, teeth_bottom))
        .quad_to(
            (CX, 2.0 * teeth_bottom - f.corner_y),
            (left.0, teeth_bottom),
        )
        .close()
        .finish();
    canvas.fill(teeth, Rgb::new(0.94, 0.92, 0.87), 1.0, Some(&mask));
}

fn draw_smile_folds(canvas: &mut Canvas, scene: &Scene, f: &MouthFrame) {
    let smile = scene.nz.smile;
    if smile <= 0.2 {
        return;
    }
    let n = &scene.id.nose;
    for side in [-1.0, 1.0] {
        let fold = canvas
            .shape(0.0)
            .open_spline(&[
                (CX + side * n.half_width * 1.35, n.base_y - 0.015),
                (CX + side * (f.half_width + 0.03), n.base_y + 0.02),
                (CX + side * (f.half_width + 0.014), f.corner_y + 0.03),
            ])
            .finish();
        let alpha = 0.3 * ((smile - 0.2) / 0.8).min(1.0);
        canvas.stroke(fold, scene.skin.darken(0.4), alpha, 0.007, None);
    }
}
