//! Scene assembly: layer order, pose transform and lighting.

use super::canvas::{linear, Canvas, Projection, CENTRE_X};
use super::color::Rgb;
use super::detmath;
use super::draw_extras::{draw_background, draw_glasses, draw_hat};
use super::draw_features::{draw_brows, draw_eyes, draw_mouth, draw_nose};
use super::draw_hair::{draw_beard, draw_hair_back, draw_hair_front, draw_moustache};
use super::draw_head::{
    draw_body, draw_ears, draw_head, draw_marks, draw_neck, draw_scar, head_path, shade_skin,
};
use super::identity::FaceIdentity;
use super::nuisance::Nuisance;
use super::postprocess::{apply_camera, to_rgb};
use image::RgbImage;
use tiny_skia::{PixmapPaint, Point, Transform};

/// Depth of the face surface used for yaw/pitch, in frame units.
const FACE_DEPTH: f32 = 0.3;

/// Everything the drawing functions need about one image.
pub(crate) struct Scene<'a> {
    pub id: &'a FaceIdentity,
    pub nz: &'a Nuisance,
    pub skin: Rgb,
    pub hair: Rgb,
    /// Unit vector on screen pointing towards the key light.
    pub light: (f32, f32),
}

impl<'a> Scene<'a> {
    fn new(id: &'a FaceIdentity, nz: &'a Nuisance) -> Self {
        Scene {
            id,
            nz,
            skin: Rgb::from_u8(id.skin.tone),
            hair: Rgb::from_u8(id.hair.colour),
            light: (detmath::sin(nz.light_angle), -detmath::cos(nz.light_angle)),
        }
    }
}

/// Renders one image; see [`super::render`].
pub(crate) fn render_image(id: &FaceIdentity, nz: &Nuisance, size: u32) -> RgbImage {
    assert!(size > 0, "image size must be positive");
    let scene = Scene::new(id, nz);
    let flat = Transform::from_scale(size as f32, size as f32);
    let mut background = Canvas::new(size, flat, Projection::flat());
    draw_background(&mut background, &scene);

    let mut subject = Canvas::new(size, subject_frame(nz, size), head_projection(id, nz));
    draw_subject(&mut subject, &scene);
    light_subject(&mut subject, &scene);

    background.pixmap.draw_pixmap(
        0,
        0,
        subject.pixmap.as_ref(),
        &PixmapPaint::default(),
        Transform::identity(),
        None,
    );
    let mut image = to_rgb(&background.pixmap);
    apply_camera(&mut image, nz);
    image
}

/// Frame units → pixels, with roll, zoom and shift about the face centre.
fn subject_frame(nz: &Nuisance, size: u32) -> Transform {
    let px = size as f32;
    let a = px * nz.scale * detmath::cos(nz.roll);
    let b = px * nz.scale * detmath::sin(nz.roll);
    let (ox, oy) = (px * (0.5 + nz.shift.0), px * (0.5 + nz.shift.1));
    Transform::from_row(a, b, -b, a, ox - 0.5 * a + 0.5 * b, oy - 0.5 * b - 0.5 * a)
}

/// Yaw/pitch projection of this identity's face surface.
fn head_projection(id: &FaceIdentity, nz: &Nuisance) -> Projection {
    let centre_y = (id.head.crown_y + id.head.chin_y) * 0.5;
    let radii = (
        id.head.half_width * 1.05,
        (id.head.chin_y - id.head.crown_y) * 0.5,
    );
    Projection::new((CENTRE_X, centre_y), radii, FACE_DEPTH, nz.yaw, nz.pitch)
}

/// Draws the person back to front.
fn draw_subject(canvas: &mut Canvas, scene: &Scene) {
    draw_hair_back(canvas, scene);
    draw_neck(canvas, scene);
    draw_body(canvas, scene);
    draw_ears(canvas, scene);
    let head = head_path(canvas, scene);
    let head_mask = canvas.mask(head.as_ref());
    draw_head(canvas, scene, head);
    shade_skin(canvas, scene, &head_mask);
    draw_marks(canvas, scene, &head_mask);
    draw_beard(canvas, scene, &head_mask);
    draw_nose(canvas, scene);
    draw_eyes(canvas, scene);
    draw_brows(canvas, scene);
    draw_scar(canvas, scene, &head_mask);
    draw_mouth(canvas, scene);
    draw_moustache(canvas, scene);
    draw_hair_front(canvas, scene);
    draw_glasses(canvas, scene);
    draw_hat(canvas, scene);
}

/// Directional shading over the whole subject (keeps the subject's alpha).
fn light_subject(canvas: &mut Canvas, scene: &Scene) {
    let s = scene.nz.light_strength;
    let (lx, ly) = scene.light;
    let centre = (CENTRE_X, 0.5);
    let lit = Point::from_xy(centre.0 + lx * 0.45, centre.1 + ly * 0.45);
    let dark = Point::from_xy(centre.0 - lx * 0.45, centre.1 - ly * 0.45);
    let warm = Rgb::new(1.0, 0.96, 0.9);
    let shader = linear(
        lit,
        dark,
        &[
            (0.0, warm, 0.28 * s),
            (0.45, warm, 0.0),
            (0.55, Rgb::BLACK, 0.0),
            (1.0, Rgb::BLACK, 0.55 * s),
        ],
    );
    canvas.shade_atop(shader);
}
