//! Drawing surface in frame units with the head-pose projection built in.
//!
//! Shapes are described in *frame units* on a frontal face and pass through
//! [`Projection`], which turns the head (yaw/pitch) by treating the face as a
//! paraboloid with depth; the [`Canvas`] transform then applies roll, zoom,
//! shift and the pixel scale. Only quadratic Béziers are emitted: tiny-skia
//! handles them without any trigonometric root finding, which keeps the
//! output identical across platforms.

use super::color::Rgb;
use super::detmath;
use tiny_skia::{
    BlendMode, FillRule, GradientStop, LineCap, LineJoin, LinearGradient, Mask, Paint, Path,
    PathBuilder, Pixmap, Point, RadialGradient, Rect, Shader, SpreadMode, Stroke, Transform,
};

/// Horizontal centre of the face in frame units.
pub(crate) const CENTRE_X: f32 = 0.5;

/// Yaw/pitch as a projection of a frontal face drawing.
#[derive(Clone, Debug)]
pub(crate) struct Projection {
    centre: (f32, f32),
    radii: (f32, f32),
    depth: f32,
    yaw: (f32, f32),
    pitch: (f32, f32),
}

impl Projection {
    /// Face surface centred at `centre` with half extents `radii` and a
    /// maximal depth `depth`, turned by `yaw` and `pitch` radians.
    pub fn new(centre: (f32, f32), radii: (f32, f32), depth: f32, yaw: f32, pitch: f32) -> Self {
        Projection {
            centre,
            radii,
            depth,
            yaw: (detmath::sin(yaw), detmath::cos(yaw)),
            pitch: (detmath::sin(pitch), detmath::cos(pitch)),
        }
    }

    /// A projection that leaves every point where it is.
    pub fn flat() -> Self {
        Projection::new((0.5, 0.5), (1.0, 1.0), 0.0, 0.0, 0.0)
    }

    /// Depth of the face surface at `(x, y)` (0 outside the face).
    fn surface_depth(&self, x: f32, y: f32) -> f32 {
        let u = (x - self.centre.0) / self.radii.0;
        let v = (y - self.centre.1) / self.radii.1;
        self.depth * (1.0 - u * u - v * v).max(0.0)
    }

    /// Screen position of the frontal point `(x, y)` raised by `bump`
    /// above the face surface.
    pub fn project(&self, x: f32, y: f32, bump: f32) -> Point {
        let z = self.surface_depth(x, y) + bump;
        let dx = x - self.centre.0;
        let dy = y - self.centre.1;
        let (sin_yaw, cos_yaw) = self.yaw;
        let (sin_pitch, cos_pitch) = self.pitch;
        let x1 = dx * cos_yaw + z * sin_yaw;
        let z1 = z * cos_yaw - dx * sin_yaw;
        let y1 = dy * cos_pitch + z1 * sin_pitch;
        Point::from_xy(self.centre.0 + x1, self.centre.1 + y1)
    }
}

/// Path builder that projects every point it receives.
pub(crate) struct Shape<'a> {
    builder: PathBuilder,
    projection: &'a Projection,
    bump: f32,
}

impl<'a> Shape<'a> {
    fn new(projection: &'a Projection, bump: f32) -> Self {
        Shape {
            builder: PathBuilder::new(),
            projection,
            bump,
        }
    }

    fn p(&self, (x, y): (f32, f32)) -> Point {
        self.projection.project(x, y, self.bump)
    }

    pub fn move_to(&mut self, a: (f32, f32)) -> &mut Self {
        let a = self.p(a);
        self.builder.move_to(a.x, a.y);
        self
    }

    pub fn line_to(&mut self, a: (f32, f32)) -> &mut Self {
        let a = self.p(a);
        self.builder.line_to(a.x, a.y);
        self
    }

    pub fn quad_to(&mut self, control: (f32, f32), end: (f32, f32)) -> &mut Self {
        let c = self.p(control);
        let e = self.p(end);
        self.builder.quad_to(c.x, c.y, e.x, e.y);
        self
    }

    pub fn close(&mut self) -> &mut Self {
        self.builder.close();
        self
    }

    /// Smooth closed curve guided by the control polygon `points`
    /// (quadratic B-spline). Repeat a point to get a sharp corner there.
    pub fn closed_spline(&mut self, points: &[(f32, f32)]) -> &mut Self {
        let n = points.len();
        if n < 3 {
            return self;
        }
        self.move_to(midpoint(points[n - 1], points[0]));
        for i in 0..n {
            self.quad_to(points[i], midpoint(points[i], points[(i + 1) % n]));
        }
        self.close()
    }

    /// Smooth open curve from the first to the last of `points`, guided by
    /// the ones in between.
    pub fn open_spline(&mut self, points: &[(f32, f32)]) -> &mut Self {
        let n = points.len();
        if n < 2 {
            return self;
        }
        self.move_to(points[0]);
        if n == 2 {
            return self.line_to(points[1]);
        }
        for i in 1..n - 2 {
            self.quad_to(points[i], midpoint(points[i], points[i + 1]));
        }
        self.quad_to(points[n - 2], points[n - 1])
    }

    /// Smooth closed curve passing *through* every point (Catmull–Rom,
    /// each cubic span approximated by two quadratics).
    pub fn closed_through(&mut self, points: &[(f32, f32)]) -> &mut Self {
        let n = points.len();
        if n < 3 {
            return self;
        }
        self.move_to(points[0]);
        for i in 0..n {
            let before = points[(i + n - 1) % n];
            let after = points[(i + 2) % n];
            self.catmull_rom_span(before, points[i], points[(i + 1) % n], after);
        }
        self.close()
    }

    /// The Catmull–Rom span from `a` to `b`, drawn as two quadratics.
    fn catmull_rom_span(
        &mut self,
        before: (f32, f32),
        a: (f32, f32),
        b: (f32, f32),
        after: (f32, f32),
    ) {
        let c1 = (a.0 + (b.0 - before.0) / 6.0, a.1 + (b.1 - before.1) / 6.0);
        let c2 = (b.0 - (after.0 - a.0) / 6.0, b.1 - (after.1 - a.1) / 6.0);
        // Split the cubic (a, c1, c2, b) at t = 1/2 and fit a quadratic to
        // each half: control = (3 (p1 + p2) − p0 − p3) / 4.
        let ab = midpoint(a, c1);
        let bc = midpoint(c1, c2);
        let cd = midpoint(c2, b);
        let abc = midpoint(ab, bc);
        let bcd = midpoint(bc, cd);
        let mid = midpoint(abc, bcd);
        let fit = |p0: (f32, f32), p1: (f32, f32), p2: (f32, f32), p3: (f32, f32)| {
            (
                (3.0 * (p1.0 + p2.0) - p0.0 - p3.0) * 0.25,
                (3.0 * (p1.1 + p2.1) - p0.1 - p3.1) * 0.25,
            )
        };
        self.quad_to(fit(a, ab, abc, mid), mid);
        self.quad_to(fit(mid, bcd, cd, b), b);
    }

    /// Ellipse of radii `(rx, ry)` around `centre`, rotated by `angle` radians.
    pub fn ellipse(&mut self, centre: (f32, f32), rx: f32, ry: f32, angle: f32) -> &mut Self {
        // Eight quadratic arcs: on-curve points every 45°, control points at
        // the odd multiples of 22.5° pushed out by 1 / cos(22.5°).
        const R: f32 = std::f32::consts::FRAC_1_SQRT_2;
        const C8: f32 = 0.923_879_5 * 1.082_392_2;
        const S8: f32 = 0.382_683_43 * 1.082_392_2;
        const ON: [(f32, f32); 8] = [
            (1.0, 0.0),
            (R, R),
            (0.0, 1.0),
            (-R, R),
            (-1.0, 0.0),
            (-R, -R),
            (0.0, -1.0),
            (R, -R),
        ];
        const OFF: [(f32, f32); 8] = [
            (C8, S8),
            (S8, C8),
            (-S8, C8),
            (-C8, S8),
            (-C8, -S8),
            (-S8, -C8),
            (S8, -C8),
            (C8, -S8),
        ];
        let (s, c) = (detmath::sin(angle), detmath::cos(angle));
        let place = |(u, v): (f32, f32)| {
            let (x, y) = (u * rx, v * ry);
            (centre.0 + x * c - y * s, centre.1 + x * s + y * c)
        };
        self.move_to(place(ON[0]));
        for i in 0..8 {
            self.quad_to(place(OFF[i]), place(ON[(i + 1) % 8]));
        }
        self.close()
    }

    /// Circle of radius `r` around `centre`.
    pub fn circle(&mut self, centre: (f32, f32), r: f32) -> &mut Self {
        self.ellipse(centre, r, r, 0.0)
    }

    /// The finished path, if it is not empty.
    pub fn finish(&mut self) -> Option<Path> {
        std::mem::take(&mut self.builder).finish()
    }
}

/// Midpoint of two points.
pub(crate) fn midpoint(a: (f32, f32), b: (f32, f32)) -> (f32, f32) {
    ((a.0 + b.0) * 0.5, (a.1 + b.1) * 0.5)
}

/// Mirrors `x` about the face centre line.
pub(crate) fn mirror_x((x, y): (f32, f32)) -> (f32, f32) {
    (2.0 * CENTRE_X - x, y)
}

/// A colour stop: position, colour, opacity.
pub(crate) type Stop = (f32, Rgb, f32);

fn gradient_stops(stops: &[Stop]) -> Vec<GradientStop> {
    stops
        .iter()
        .map(|(pos, colour, alpha)| GradientStop::new(*pos, colour.with_alpha(*alpha)))
        .collect()
}

/// Linear gradient from `start` to `end` (screen frame units).
pub(crate) fn linear(start: Point, end: Point, stops: &[Stop]) -> Option<Shader<'static>> {
    LinearGradient::new(
        start,
        end,
        gradient_stops(stops),
        SpreadMode::Pad,
        Transform::identity(),
    )
}

/// Elliptical radial gradient around `centre` (screen frame units).
pub(crate) fn radial(centre: Point, rx: f32, ry: f32, stops: &[Stop]) -> Option<Shader<'static>> {
    let to_ellipse = Transform::from_row(rx, 0.0, 0.0, ry, centre.x, centre.y);
    RadialGradient::new(
        Point::zero(),
        Point::zero(),
        1.0,
        gradient_stops(stops),
        SpreadMode::Pad,
        to_ellipse,
    )
}

/// A pixmap plus the transforms that place frame units on it.
pub(crate) struct Canvas {
    pub pixmap: Pixmap,
    pub projection: Projection,
    frame: Transform,
    pixel: f32,
}

impl Canvas {
    /// Transparent square canvas of `size` pixels; `frame` maps frame
    /// units to pixels.
    pub fn new(size: u32, frame: Transform, projection: Projection) -> Self {
        let pixmap = Pixmap::new(size, size).expect("canvas size must be non-zero");
        let zoom = (frame.sx * frame.sx + frame.ky * frame.ky).sqrt();
        Canvas {
            pixmap,
            projection,
            frame,
            pixel: 1.0 / zoom.max(1.0),
        }
    }

    /// New projected path builder; `bump` raises the shape above the face surface.
    pub fn shape(&self, bump: f32) -> Shape<'_> {
        Shape::new(&self.projection, bump)
    }

    /// Screen position (frame units) of a frontal point.
    pub fn at(&self, x: f32, y: f32, bump: f32) -> Point {
        self.projection.project(x, y, bump)
    }

    /// Fills `path` with a solid colour.
    pub fn fill(&mut self, path: Option<Path>, colour: Rgb, alpha: f32, mask: Option<&Mask>) {
        let mut paint = Paint::default();
        paint.set_color(colour.with_alpha(alpha));
        self.fill_paint(path, &paint, mask);
    }

    /// Fills `path` with a gradient or other shader.
    pub fn fill_shader(&mut self, path: Option<Path>, shader: Option<Shader>, mask: Option<&Mask>) {
        if let Some(shader) = shader {
            let paint = Paint {
                shader,
                ..Paint::default()
            };
            self.fill_paint(path, &paint, mask);
        }
    }

    /// Paints `shader` over everything already drawn, keeping its alpha
    /// (used for lighting the subject layer).
    pub fn shade_atop(&mut self, shader: Option<Shader>) {
        if let Some(shader) = shader {
            let paint = Paint {
                shader,
                blend_mode: BlendMode::SourceAtop,
                ..Paint::default()
            };
            let whole = Rect::from_xywh(-1.0, -1.0, 3.0, 3.0).map(PathBuilder::from_rect);
            self.fill_paint(whole, &paint, None);
        }
    }

    fn fill_paint(&mut self, path: Option<Path>, paint: &Paint, mask: Option<&Mask>) {
        if let Some(path) = path {
            self.pixmap
                .fill_path(&path, paint, FillRule::Winding, self.frame, mask);
        }
    }

    /// Strokes `path` with round caps; `width` is in frame units and never
    /// drops below 0.7 px so that thin features survive at 64×64.
    pub fn stroke(
        &mut self,
        path: Option<Path>,
        colour: Rgb,
        alpha: f32,
        width: f32,
        mask: Option<&Mask>,
    ) {
        let Some(path) = path else { return };
        let mut paint = Paint::default();
        paint.set_color(colour.with_alpha(alpha));
        let stroke = Stroke {
            width: width.max(0.7 * self.pixel),
            line_cap: LineCap::Round,
            line_join: LineJoin::Round,
            ..Stroke::default()
        };
        self.pixmap
            .stroke_path(&path, &paint, &stroke, self.frame, mask);
    }

    /// Coverage mask of `path`, for clipping later drawing to it.
    pub fn mask(&self, path: Option<&Path>) -> Mask {
        let mut mask = Mask::new(self.pixmap.width(), self.pixmap.height())
            .expect("canvas size must be non-zero");
        if let Some(path) = path {
            mask.fill_path(path, FillRule::Winding, true, self.frame);
        }
        mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontal_projection_is_identity() {
        let p = Projection::new((0.5, 0.5), (0.3, 0.5), 0.3, 0.0, 0.0);
        let q = p.project(0.4, 0.45, 0.05);
        assert!((q.x - 0.4).abs() < 1e-6 && (q.y - 0.45).abs() < 1e-6);
    }

    #[test]
    fn yaw_moves_raised_points_further() {
        let p = Projection::new((0.5, 0.5), (0.3, 0.5), 0.3, 0.2, 0.0);
        let nose = p.project(0.5, 0.6, 0.07).x - 0.5;
        let cheek = p.project(0.5, 0.6, 0.0).x - 0.5;
        assert!(nose > cheek && cheek > 0.0);
    }

    #[test]
    fn ellipse_stays_close_to_the_true_curve() {
        let projection = Projection::flat();
        let mut canvas = Canvas::new(100, Transform::from_scale(100.0, 100.0), projection);
        let path = canvas.shape(0.0).circle((0.5, 0.5), 0.3).finish();
        canvas.fill(path, Rgb::WHITE, 1.0, None);
        let covered = canvas
            .pixmap
            .pixels()
            .iter()
            .filter(|p| p.alpha() > 127)
            .count();
        let expected = std::f32::consts::PI * 30.0 * 30.0;
        assert!((covered as f32 - expected).abs() < expected * 0.02);
    }
}
