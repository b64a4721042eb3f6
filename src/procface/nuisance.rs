//! Per-image nuisance: pose, expression, lighting, background, accessories
//! and camera effects. None of these change who the person is.

use super::color::Rgb;
use super::rng::{stream, Sample};
use rand::Rng;
use rand_chacha::ChaCha20Rng;

/// Domain tags of the per-group nuisance streams.
mod domain {
    pub const POSE: u64 = 0x5A_0001;
    pub const EXPRESSION: u64 = 0x5A_0002;
    pub const LIGHT: u64 = 0x5A_0003;
    pub const SCENE: u64 = 0x5A_0004;
    pub const ACCESSORIES: u64 = 0x5A_0005;
    pub const CAMERA: u64 = 0x5A_0006;
}

/// Everything about one image of a person that is *not* identity.
#[derive(Clone, Debug, PartialEq)]
pub struct Nuisance {
    /// Head turn in radians; positive turns the face towards the image's right.
    pub yaw: f32,
    /// Head nod in radians; positive tilts the face downwards.
    pub pitch: f32,
    /// In-plane head rotation in radians (clockwise on screen).
    pub roll: f32,
    /// Smile, −0.3 (slight frown) to 1 (open smile showing teeth).
    pub smile: f32,
    /// Eye openness, 0 (closed) to ~1.1 (wide open).
    pub eye_open: f32,
    /// Eyebrow raise, −1 (frown) to 1 (surprised).
    pub brow_raise: f32,
    /// Gaze direction as a fraction of the iris travel, each in −1..1.
    pub gaze: (f32, f32),
    /// Direction the key light comes from, radians clockwise from straight above.
    pub light_angle: f32,
    /// Strength of the shading gradient over the subject, 0 to 1.
    pub light_strength: f32,
    /// Overall brightness multiplier.
    pub exposure: f32,
    /// White-balance gains for red and blue (green stays 1).
    pub white_balance: (f32, f32),
    /// Backdrop.
    pub background: Background,
    /// Colour of the visible clothing (sRGB).
    pub clothing: [u8; 3],
    /// Optional glasses.
    pub glasses: Option<Glasses>,
    /// Optional hat.
    pub hat: Option<Hat>,
    /// Zoom factor around the face centre.
    pub scale: f32,
    /// Translation of the face in frame units.
    pub shift: (f32, f32),
    /// Gaussian blur standard deviation in frame units (0 = sharp).
    pub blur: f32,
    /// Standard deviation of additive pixel noise, in 8-bit levels.
    pub noise: f32,
    /// Seed of the pixel-noise pattern.
    pub noise_seed: u64,
}

/// Backdrop styles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackgroundStyle {
    /// Linear gradient between the two colours.
    Gradient,
    /// Radial vignette from `colour_a` (centre) to `colour_b`.
    Vignette,
    /// Gradient with large out-of-focus blobs.
    Bokeh,
}

/// Backdrop description.
#[derive(Clone, Debug, PartialEq)]
pub struct Background {
    /// Style.
    pub style: BackgroundStyle,
    /// First colour (sRGB).
    pub colour_a: [u8; 3],
    /// Second colour (sRGB).
    pub colour_b: [u8; 3],
    /// Gradient direction in radians.
    pub angle: f32,
    /// Seed of the bokeh blob layout.
    pub blob_seed: u64,
}

/// Glasses frame shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GlassesStyle {
    /// Round lenses.
    Round,
    /// Rectangular lenses.
    Rectangular,
    /// Teardrop (aviator) lenses.
    Aviator,
}

/// Glasses.
#[derive(Clone, Debug, PartialEq)]
pub struct Glasses {
    /// Frame shape.
    pub style: GlassesStyle,
    /// Frame colour (sRGB).
    pub frame: [u8; 3],
    /// Frame thickness in frame units.
    pub thickness: f32,
    /// Lens darkening, 0 (clear) to 1 (sunglasses).
    pub tint: f32,
}

/// Hat shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HatStyle {
    /// Knitted beanie with a folded band.
    Beanie,
    /// Baseball cap with a brim.
    Cap,
}

/// A hat.
#[derive(Clone, Debug, PartialEq)]
pub struct Hat {
    /// Shape.
    pub style: HatStyle,
    /// Colour (sRGB).
    pub colour: [u8; 3],
}

impl Nuisance {
    /// Samples the nuisance of image `sample_seed` of identity `identity_seed`.
    ///
    /// Pure function of both seeds: the same pair always gives the same value.
    /// Distributions are kept moderate so that identity stays the dominant
    /// signal (yaw within ±19°, roll within ±10°, accessories on a minority of
    /// images).
    pub fn from_seed(identity_seed: u64, sample_seed: u64) -> Self {
        let part = |tag: u64| stream(identity_seed, sample_seed, tag);
        let mut pose = part(domain::POSE);
        let mut expression = part(domain::EXPRESSION);
        let mut light = part(domain::LIGHT);
        let mut scene = part(domain::SCENE);
        let mut accessories = part(domain::ACCESSORIES);
        let mut camera = part(domain::CAMERA);
        Nuisance {
            yaw: (pose.bell() * 0.13).clamp(-0.33, 0.33),
            pitch: (pose.bell() * 0.08).clamp(-0.2, 0.2),
            roll: (pose.bell() * 0.06).clamp(-0.17, 0.17),
            smile: sample_smile(&mut expression),
            eye_open: sample_eye_open(&mut expression),
            brow_raise: (expression.bell() * 0.4).clamp(-1.0, 1.0),
            gaze: (
                (expression.bell() * 0.3).clamp(-1.0, 1.0),
                (expression.bell() * 0.2).clamp(-1.0, 1.0),
            ),
            light_angle: light.bell() * 0.9,
            light_strength: light.uniform(0.1, 0.6),
            exposure: light.uniform(0.86, 1.1),
            white_balance: (light.uniform(0.95, 1.05), light.uniform(0.95, 1.05)),
            background: sample_background(&mut scene),
            clothing: sample_clothing(&mut scene),
            glasses: accessories
                .chance(0.2)
                .then(|| sample_glasses(&mut accessories)),
            hat: accessories
                .chance(0.12)
                .then(|| sample_hat(&mut accessories)),
            scale: 1.0 + (pose.bell() * 0.03).clamp(-0.07, 0.07),
            shift: (
                (pose.bell() * 0.014).clamp(-0.04, 0.04),
                (pose.bell() * 0.014).clamp(-0.04, 0.04),
            ),
            blur: if camera.chance(0.5) {
                0.0
            } else {
                camera.uniform(0.002, 0.011)
            },
            noise: if camera.chance(0.5) {
                0.0
            } else {
                camera.uniform(0.5, 3.0)
            },
            noise_seed: camera.random::<u64>(),
        }
    }

    /// Frontal pose, relaxed expression, soft top light, plain grey
    /// backdrop, no accessories and no camera degradation.
    pub fn neutral() -> Self {
        Nuisance {
            yaw: 0.0,
            pitch: 0.0,
            roll: 0.0,
            smile: 0.1,
            eye_open: 1.0,
            brow_raise: 0.0,
            gaze: (0.0, 0.0),
            light_angle: -0.3,
            light_strength: 0.3,
            exposure: 1.0,
            white_balance: (1.0, 1.0),
            background: Background {
                style: BackgroundStyle::Gradient,
                colour_a: [196, 200, 206],
                colour_b: [150, 156, 166],
                angle: 0.0,
                blob_seed: 0,
            },
            clothing: [70, 84, 110],
            glasses: None,
            hat: None,
            scale: 1.0,
            shift: (0.0, 0.0),
            blur: 0.0,
            noise: 0.0,
            noise_seed: 0,
        }
    }
}

/// Mostly relaxed faces, some gentle and some broad smiles.
fn sample_smile(rng: &mut ChaCha20Rng) -> f32 {
    match rng.weighted(&[0.45, 0.3, 0.25]) {
        0 => rng.uniform(-0.3, 0.25),
        1 => rng.uniform(0.25, 0.6),
        _ => rng.uniform(0.6, 1.0),
    }
}

/// Open eyes with the occasional blink.
fn sample_eye_open(rng: &mut ChaCha20Rng) -> f32 {
    if rng.chance(0.06) {
        rng.uniform(0.0, 0.2)
    } else {
        rng.uniform(0.7, 1.1)
    }
}

/// Muted studio or indoor backdrops.
fn sample_background(rng: &mut ChaCha20Rng) -> Background {
    let style = [
        BackgroundStyle::Gradient,
        BackgroundStyle::Vignette,
        BackgroundStyle::Bokeh,
    ][rng.weighted(&[0.45, 0.25, 0.3])];
    let hue = rng.uniform(0.0, 1.0);
    let sat = rng.uniform(0.03, 0.4);
    let val = rng.uniform(0.3, 0.92);
    let colour_a = Rgb::from_hsv(hue, sat, val);
    let colour_b = Rgb::from_hsv(
        hue + rng.uniform(-0.12, 0.12),
        (sat + rng.uniform(-0.1, 0.15)).clamp(0.0, 0.6),
        (val * rng.uniform(0.55, 1.05)).clamp(0.1, 0.95),
    );
    Background {
        style,
        colour_a: colour_a.to_u8(),
        colour_b: colour_b.to_u8(),
        angle: rng.uniform(-1.2, 1.2),
        blob_seed: rng.random::<u64>(),
    }
}

fn sample_clothing(rng: &mut ChaCha20Rng) -> [u8; 3] {
    Rgb::from_hsv(
        rng.uniform(0.0, 1.0),
        rng.uniform(0.05, 0.7),
        rng.uniform(0.15, 0.85),
    )
    .to_u8()
}

fn sample_glasses(rng: &mut ChaCha20Rng) -> Glasses {
    let style = [
        GlassesStyle::Round,
        GlassesStyle::Rectangular,
        GlassesStyle::Aviator,
    ][rng.weighted(&[1.0, 1.4, 0.6])];
    let frame = [
        [20, 20, 22],
        [70, 42, 26],
        [170, 150, 100],
        [160, 164, 170],
        [120, 30, 40],
    ][rng.weighted(&[3.0, 1.5, 1.0, 1.0, 0.5])];
    Glasses {
        style,
        frame,
        thickness: rng.uniform(0.006, 0.014),
        tint: if rng.chance(0.15) {
            rng.uniform(0.6, 0.9)
        } else {
            rng.uniform(0.0, 0.12)
        },
    }
}

fn sample_hat(rng: &mut ChaCha20Rng) -> Hat {
    Hat {
        style: if rng.chance(0.5) {
            HatStyle::Beanie
        } else {
            HatStyle::Cap
        },
        colour: Rgb::from_hsv(
            rng.uniform(0.0, 1.0),
            rng.uniform(0.1, 0.8),
            rng.uniform(0.15, 0.8),
        )
        .to_u8(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nuisance_is_a_pure_function_of_both_seeds() {
        assert_eq!(Nuisance::from_seed(3, 9), Nuisance::from_seed(3, 9));
        assert_ne!(Nuisance::from_seed(3, 9), Nuisance::from_seed(3, 10));
        assert_ne!(Nuisance::from_seed(3, 9), Nuisance::from_seed(4, 9));
    }

    #[test]
    fn pose_stays_moderate() {
        for sample in 0..300 {
            let n = Nuisance::from_seed(1, sample);
            assert!(n.yaw.abs() <= 0.33 && n.pitch.abs() <= 0.2 && n.roll.abs() <= 0.17);
            assert!((0.93..=1.07).contains(&n.scale));
        }
    }
}
