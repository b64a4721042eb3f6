//! Identity parameters: everything that stays fixed across the images of one
//! synthetic person. All positions and lengths are in *frame units*: the
//! output image spans `[0, 1] × [0, 1]`, x to the right, y downwards, and the
//! face is centred on `x = 0.5`.

use super::color::{skin_ramp, Rgb, EYE_COLOURS, HAIR_COLOURS};
use super::rng::{stream, Sample};
use rand::Rng;
use rand_chacha::ChaCha20Rng;

/// Domain tags of the per-part identity streams.
mod domain {
    pub const HEAD: u64 = 0x1D_0001;
    pub const SKIN: u64 = 0x1D_0002;
    pub const EYES: u64 = 0x1D_0003;
    pub const BROWS: u64 = 0x1D_0004;
    pub const NOSE: u64 = 0x1D_0005;
    pub const MOUTH: u64 = 0x1D_0006;
    pub const EARS: u64 = 0x1D_0007;
    pub const HAIR: u64 = 0x1D_0008;
    pub const FACIAL_HAIR: u64 = 0x1D_0009;
    pub const MARKS: u64 = 0x1D_000A;
}

/// The complete, fixed appearance of one synthetic person.
#[derive(Clone, Debug, PartialEq)]
pub struct FaceIdentity {
    /// Seed this identity was derived from.
    pub seed: u64,
    /// Head outline and jaw.
    pub head: HeadShape,
    /// Skin, lip and cheek colouring.
    pub skin: Skin,
    /// Eye geometry and iris colour.
    pub eyes: Eyes,
    /// Eyebrows.
    pub brows: Brows,
    /// Nose.
    pub nose: Nose,
    /// Mouth and lips.
    pub mouth: Mouth,
    /// Ears.
    pub ears: Ears,
    /// Scalp hair.
    pub hair: Hair,
    /// Beard and moustache.
    pub facial_hair: FacialHair,
    /// Moles, freckles and scars.
    pub marks: Marks,
}

/// Head outline, described on its right half (the left half mirrors it).
#[derive(Clone, Debug, PartialEq)]
pub struct HeadShape {
    /// Half width of the face at the cheekbones.
    pub half_width: f32,
    /// Height of the cheekbones (widest point).
    pub cheek_y: f32,
    /// Top of the skull.
    pub crown_y: f32,
    /// Temple width as a fraction of `half_width`.
    pub temple_ratio: f32,
    /// Jaw-corner width as a fraction of `half_width`.
    pub jaw_ratio: f32,
    /// Height of the jaw corners.
    pub jaw_y: f32,
    /// Chin width as a fraction of `half_width`.
    pub chin_ratio: f32,
    /// Bottom of the chin.
    pub chin_y: f32,
    /// Neck half width as a fraction of `half_width`.
    pub neck_ratio: f32,
}

/// Skin colouring.
#[derive(Clone, Debug, PartialEq)]
pub struct Skin {
    /// Base skin colour (sRGB).
    pub tone: [u8; 3],
    /// Lip colour (sRGB).
    pub lips: [u8; 3],
    /// Cheek redness, 0 (none) to 1.
    pub blush: f32,
}

/// Eye geometry (right eye; the left eye mirrors it).
#[derive(Clone, Debug, PartialEq)]
pub struct Eyes {
    /// Height of the eye centres.
    pub y: f32,
    /// Horizontal distance from the face centre to each eye centre.
    pub spacing: f32,
    /// Corner-to-corner eye width.
    pub width: f32,
    /// Open-eye height as a fraction of `width`.
    pub height_ratio: f32,
    /// Canthal tilt: how much higher the outer corner sits (fraction of width).
    pub tilt: f32,
    /// Where the upper lid peaks, −1 (inner corner) to 1 (outer corner).
    pub lid_peak: f32,
    /// Iris diameter as a fraction of `width`.
    pub iris_ratio: f32,
    /// Iris colour (sRGB).
    pub iris: [u8; 3],
    /// Visibility of the upper-lid crease, 0 (monolid) to 1.
    pub crease: f32,
    /// Thickness of the upper lash line, in frame units.
    pub lash: f32,
}

/// Eyebrows (right brow; the left mirrors it).
#[derive(Clone, Debug, PartialEq)]
pub struct Brows {
    /// Gap between the eye centre line and the brow.
    pub gap: f32,
    /// Maximum thickness.
    pub thickness: f32,
    /// Arch height.
    pub arch: f32,
    /// Rise of the outer end relative to the inner end (negative = droop).
    pub slant: f32,
    /// Length as a fraction of the eye width.
    pub length: f32,
    /// Brow colour (sRGB).
    pub colour: [u8; 3],
}

/// Nose.
#[derive(Clone, Debug, PartialEq)]
pub struct Nose {
    /// Height of the nose base (nostrils).
    pub base_y: f32,
    /// Half width across the nostril wings.
    pub half_width: f32,
    /// Size of the rounded tip, 0 (fine) to 1 (bulbous).
    pub tip: f32,
    /// Strength of the bridge shading, 0 to 1.
    pub bridge: f32,
}

/// Mouth and lips.
#[derive(Clone, Debug, PartialEq)]
pub struct Mouth {
    /// Height of the lip line.
    pub y: f32,
    /// Half width, corner to centre.
    pub half_width: f32,
    /// Upper-lip thickness.
    pub upper: f32,
    /// Lower-lip thickness.
    pub lower: f32,
    /// Depth of the Cupid's bow, 0 to 1.
    pub bow: f32,
    /// Natural corner lift (positive = slightly upturned).
    pub corner_lift: f32,
}

/// Ears.
#[derive(Clone, Debug, PartialEq)]
pub struct Ears {
    /// Ear height.
    pub height: f32,
    /// How far the ear sticks out sideways from the head outline.
    pub protrusion: f32,
    /// Vertical offset of the ear centre from the eye line.
    pub drop: f32,
}

/// Hair styles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HairStyle {
    /// No scalp hair apart from a thin band at the sides.
    Bald,
    /// Very short, the scalp shows through.
    Buzz,
    /// Short cut with some volume.
    Short,
    /// Short-to-medium cut swept across the forehead.
    SideSwept,
    /// Short cut with a straight fringe.
    Fringe,
    /// Chin-length bob.
    Bob,
    /// Hair to the shoulders or longer.
    Long,
    /// Voluminous curls.
    Curly,
    /// Pulled back into a bun on top.
    Bun,
}

impl HairStyle {
    /// Every style, in sampling order.
    pub const ALL: [HairStyle; 9] = [
        HairStyle::Bald,
        HairStyle::Buzz,
        HairStyle::Short,
        HairStyle::SideSwept,
        HairStyle::Fringe,
        HairStyle::Bob,
        HairStyle::Long,
        HairStyle::Curly,
        HairStyle::Bun,
    ];
    const WEIGHTS: [f32; 9] = [0.7, 0.9, 2.0, 1.2, 1.0, 1.0, 1.8, 0.8, 0.6];
}

/// Scalp hair.
#[derive(Clone, Debug, PartialEq)]
pub struct Hair {
    /// Style.
    pub style: HairStyle,
    /// Hair colour (sRGB).
    pub colour: [u8; 3],
    /// Height of the hairline at the forehead centre.
    pub hairline_y: f32,
    /// Extra height of the hairline at the temples (receding corners).
    pub recession: f32,
    /// Depth of a widow's peak (0 = none).
    pub widow_peak: f32,
    /// How far the hair stands off the skull.
    pub volume: f32,
    /// Parting position, −1 (far left) to 1 (far right).
    pub part: f32,
    /// Lowest point of long hair (styles `Bob`, `Long`).
    pub length_y: f32,
    /// Whether `Bob`/`Long` hair also has a fringe.
    pub bangs: bool,
    /// Lowest point of a fringe.
    pub fringe_y: f32,
    /// Seed of the strand and curl texture.
    pub texture_seed: u64,
}

/// Facial-hair styles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FacialHairStyle {
    /// Clean shaven.
    None,
    /// Short shadow over the beard area.
    Stubble,
    /// Moustache only.
    Moustache,
    /// Moustache and chin beard.
    Goatee,
    /// Full beard.
    FullBeard,
}

/// Beard and moustache.
#[derive(Clone, Debug, PartialEq)]
pub struct FacialHair {
    /// Style.
    pub style: FacialHairStyle,
    /// Opacity of the hair, 0 to 1.
    pub density: f32,
    /// How far a full beard extends below the chin.
    pub fullness: f32,
}

/// A mole.
#[derive(Clone, Debug, PartialEq)]
pub struct Mole {
    /// Centre x.
    pub x: f32,
    /// Centre y.
    pub y: f32,
    /// Radius.
    pub radius: f32,
}

/// A scar: a thin light line through three points.
#[derive(Clone, Debug, PartialEq)]
pub struct Scar {
    /// Start, middle and end points.
    pub points: [(f32, f32); 3],
    /// Line width.
    pub width: f32,
}

/// Facial marks.
#[derive(Clone, Debug, PartialEq)]
pub struct Marks {
    /// Moles (zero to three).
    pub moles: Vec<Mole>,
    /// Freckle density, 0 (none) to 1.
    pub freckles: f32,
    /// Seed of the freckle pattern.
    pub freckle_seed: u64,
    /// Optional scar.
    pub scar: Option<Scar>,
}

impl FaceIdentity {
    /// Derives an identity deterministically from `seed`.
    ///
    /// Each group of parameters comes from its own ChaCha20 stream, so the
    /// result is identical on every platform and for every image size.
    pub fn from_seed(seed: u64) -> Self {
        let part = |tag: u64| stream(seed, 0, tag);
        let head = sample_head(&mut part(domain::HEAD));
        let skin = sample_skin(&mut part(domain::SKIN));
        let eyes = sample_eyes(&mut part(domain::EYES));
        let hair = sample_hair(&mut part(domain::HAIR), &skin, &head, &eyes);
        let brows = sample_brows(&mut part(domain::BROWS), &hair);
        let nose = sample_nose(&mut part(domain::NOSE), &eyes);
        let mouth = sample_mouth(&mut part(domain::MOUTH), &nose, &head);
        let head = fit_chin_below_mouth(head, &mouth);
        let ears = sample_ears(&mut part(domain::EARS));
        let facial_hair = sample_facial_hair(&mut part(domain::FACIAL_HAIR), &hair);
        let marks = sample_marks(&mut part(domain::MARKS), &skin, &eyes, &mouth);
        FaceIdentity {
            seed,
            head,
            skin,
            eyes,
            brows,
            nose,
            mouth,
            ears,
            hair,
            facial_hair,
            marks,
        }
    }
}

fn sample_head(rng: &mut ChaCha20Rng) -> HeadShape {
    HeadShape {
        half_width: rng.uniform(0.32, 0.37),
        cheek_y: rng.uniform(0.45, 0.5),
        crown_y: rng.uniform(0.0, 0.055),
        temple_ratio: rng.uniform(0.86, 0.99),
        jaw_ratio: rng.uniform(0.68, 0.86),
        jaw_y: rng.uniform(0.72, 0.78),
        chin_ratio: rng.uniform(0.24, 0.42),
        chin_y: rng.uniform(0.9, 0.97),
        neck_ratio: rng.uniform(0.42, 0.56),
    }
}

/// Keeps at least a plausible chin height below the lower lip.
fn fit_chin_below_mouth(mut head: HeadShape, mouth: &Mouth) -> HeadShape {
    let min_chin = mouth.y + mouth.lower + 0.1;
    head.chin_y = head.chin_y.max(min_chin).min(0.985);
    head.jaw_y = head.jaw_y.max(mouth.y + 0.01).min(head.chin_y - 0.1);
    head
}

fn sample_skin(rng: &mut ChaCha20Rng) -> Skin {
    let base = skin_ramp(rng.uniform(0.0, 1.0));
    let undertone = rng.uniform(-1.0, 1.0);
    let tone = if undertone > 0.0 {
        base.mix(
            Rgb::new(base.r, base.g * 0.93, base.b * 0.8),
            undertone * 0.5,
        )
    } else {
        base.mix(
            Rgb::new(base.r * 0.96, base.g * 0.9, base.b * 0.92),
            -undertone * 0.5,
        )
    };
    let lip_red = Rgb::new(0.72, 0.3, 0.32);
    let lips = tone
        .mix(lip_red, rng.uniform(0.3, 0.5))
        .scale(rng.uniform(0.74, 0.88));
    Skin {
        tone: tone.to_u8(),
        lips: lips.to_u8(),
        blush: rng.uniform(0.0, 1.0),
    }
}

fn sample_eyes(rng: &mut ChaCha20Rng) -> Eyes {
    let iris_weights: Vec<f32> = EYE_COLOURS.iter().map(|(_, w)| *w).collect();
    let iris = EYE_COLOURS[rng.weighted(&iris_weights)].0;
    Eyes {
        y: 0.41 + 0.008 * rng.bell(),
        spacing: rng.uniform(0.138, 0.165),
        width: rng.uniform(0.112, 0.138),
        height_ratio: rng.uniform(0.34, 0.52),
        tilt: rng.uniform(-0.06, 0.14),
        lid_peak: rng.uniform(-0.4, 0.35),
        iris_ratio: rng.uniform(0.4, 0.5),
        iris,
        crease: rng.uniform(0.0, 1.0),
        lash: rng.uniform(0.008, 0.016),
    }
}

fn sample_brows(rng: &mut ChaCha20Rng, hair: &Hair) -> Brows {
    let hair_colour = Rgb::from_u8(hair.colour);
    let brown = Rgb::new(0.32, 0.2, 0.13);
    let colour = if hair_colour.luma() > 0.5 {
        hair_colour.mix(brown, rng.uniform(0.5, 0.75))
    } else {
        hair_colour.darken(rng.uniform(0.15, 0.35))
    };
    Brows {
        gap: rng.uniform(0.06, 0.085),
        thickness: rng.uniform(0.014, 0.03),
        arch: rng.uniform(0.004, 0.02),
        slant: rng.uniform(-0.012, 0.015),
        length: rng.uniform(1.15, 1.45),
        colour: colour.to_u8(),
    }
}

fn sample_nose(rng: &mut ChaCha20Rng, eyes: &Eyes) -> Nose {
    Nose {
        base_y: eyes.y + rng.uniform(0.16, 0.2),
        half_width: rng.uniform(0.045, 0.07),
        tip: rng.uniform(0.0, 1.0),
        bridge: rng.uniform(0.2, 1.0),
    }
}

fn sample_mouth(rng: &mut ChaCha20Rng, nose: &Nose, head: &HeadShape) -> Mouth {
    Mouth {
        y: nose.base_y + rng.uniform(0.085, 0.11),
        half_width: rng.uniform(0.08, 0.11) * (head.half_width / 0.345),
        upper: rng.uniform(0.016, 0.03),
        lower: rng.uniform(0.022, 0.04),
        bow: rng.uniform(0.1, 1.0),
        corner_lift: rng.uniform(-0.006, 0.006),
    }
}

fn sample_ears(rng: &mut ChaCha20Rng) -> Ears {
    Ears {
        height: rng.uniform(0.13, 0.19),
        protrusion: rng.uniform(0.02, 0.055),
        drop: rng.uniform(0.03, 0.07),
    }
}

fn sample_hair_colour(rng: &mut ChaCha20Rng, skin: &Skin) -> [u8; 3] {
    let dark_skin = Rgb::from_u8(skin.tone).luma() < 0.45;
    let weights: Vec<f32> = HAIR_COLOURS
        .iter()
        .enumerate()
        .map(|(i, (_, w))| {
            if dark_skin && (4..=8).contains(&i) {
                w * 0.25
            } else {
                *w
            }
        })
        .collect();
    HAIR_COLOURS[rng.weighted(&weights)].0
}

fn sample_hair(rng: &mut ChaCha20Rng, skin: &Skin, head: &HeadShape, eyes: &Eyes) -> Hair {
    let style = HairStyle::ALL[rng.weighted(&HairStyle::WEIGHTS)];
    let colour = sample_hair_colour(rng, skin);
    let hairline_y = (head.crown_y + rng.uniform(0.12, 0.19)).min(eyes.y - 0.15);
    let recession = if rng.chance(0.3) {
        rng.uniform(0.02, 0.06)
    } else {
        rng.uniform(0.0, 0.015)
    };
    let volume = match style {
        HairStyle::Curly => rng.uniform(0.07, 0.12),
        HairStyle::Buzz | HairStyle::Bald => 0.004,
        HairStyle::Bun => rng.uniform(0.008, 0.018),
        _ => rng.uniform(0.018, 0.05),
    };
    let length_y = match style {
        HairStyle::Bob => rng.uniform(0.72, 0.86),
        _ => rng.uniform(0.95, 1.2),
    };
    Hair {
        style,
        colour,
        hairline_y,
        recession,
        widow_peak: if rng.chance(0.25) {
            rng.uniform(0.01, 0.025)
        } else {
            0.0
        },
        volume,
        part: rng.uniform(-1.0, 1.0),
        length_y,
        bangs: rng.chance(0.35),
        fringe_y: eyes.y - rng.uniform(0.1, 0.14),
        texture_seed: rng.random::<u64>(),
    }
}

fn sample_facial_hair(rng: &mut ChaCha20Rng, hair: &Hair) -> FacialHair {
    let long_hair = matches!(
        hair.style,
        HairStyle::Long | HairStyle::Bob | HairStyle::Bun
    );
    let beard_scale = if long_hair { 0.3 } else { 1.0 };
    let weights = [
        6.0,
        1.2 * beard_scale,
        0.7 * beard_scale,
        0.8 * beard_scale,
        1.3 * beard_scale,
    ];
    let style = [
        FacialHairStyle::None,
        FacialHairStyle::Stubble,
        FacialHairStyle::Moustache,
        FacialHairStyle::Goatee,
        FacialHairStyle::FullBeard,
    ][rng.weighted(&weights)];
    FacialHair {
        style,
        density: rng.uniform(0.65, 0.95),
        fullness: rng.uniform(0.0, 0.05),
    }
}

fn sample_marks(rng: &mut ChaCha20Rng, skin: &Skin, eyes: &Eyes, mouth: &Mouth) -> Marks {
    let mole_count = rng.weighted(&[4.0, 3.0, 1.5, 0.6]);
    let moles = (0..mole_count)
        .map(|_| sample_mole(rng, eyes, mouth))
        .collect();
    let fair = Rgb::from_u8(skin.tone).luma() > 0.62;
    let freckles = if rng.chance(if fair { 0.35 } else { 0.1 }) {
        rng.uniform(0.4, 1.0)
    } else {
        0.0
    };
    let freckle_seed = rng.random::<u64>();
    let scar = rng.chance(0.12).then(|| sample_scar(rng, eyes));
    Marks {
        moles,
        freckles,
        freckle_seed,
        scar,
    }
}

/// A mole on the cheeks, chin, forehead or beside the mouth.
fn sample_mole(rng: &mut ChaCha20Rng, eyes: &Eyes, mouth: &Mouth) -> Mole {
    let side = rng.sign();
    let (x, y) = match rng.weighted(&[3.0, 1.0, 1.0, 1.5]) {
        0 => (
            side * rng.uniform(0.1, 0.2),
            rng.uniform(eyes.y + 0.09, mouth.y - 0.02),
        ),
        1 => (rng.uniform(-0.05, 0.05), mouth.y + rng.uniform(0.08, 0.12)),
        2 => (rng.uniform(-0.12, 0.12), eyes.y - rng.uniform(0.12, 0.16)),
        _ => (
            side * (mouth.half_width + rng.uniform(0.015, 0.035)),
            mouth.y + rng.uniform(-0.035, 0.015),
        ),
    };
    Mole {
        x: 0.5 + x,
        y,
        radius: rng.uniform(0.006, 0.013),
    }
}

/// A scar across a cheek, the forehead, or through an eyebrow.
fn sample_scar(rng: &mut ChaCha20Rng, eyes: &Eyes) -> Scar {
    let side = rng.sign();
    let (cx, cy, len, angle_dx) = match rng.weighted(&[2.0, 1.0, 1.0]) {
        0 => (
            side * rng.uniform(0.13, 0.19),
            eyes.y + rng.uniform(0.1, 0.17),
            0.07,
            0.4,
        ),
        1 => (
            rng.uniform(-0.1, 0.1),
            eyes.y - rng.uniform(0.15, 0.2),
            0.08,
            1.0,
        ),
        _ => (
            side * (eyes.spacing + rng.uniform(-0.01, 0.03)),
            eyes.y - 0.07,
            0.06,
            0.15,
        ),
    };
    let dx = angle_dx * len * rng.sign();
    let dy = len;
    let bend = rng.uniform(-0.01, 0.01);
    let (x0, y0) = (0.5 + cx - dx / 2.0, cy - dy / 2.0);
    let (x2, y2) = (0.5 + cx + dx / 2.0, cy + dy / 2.0);
    Scar {
        points: [(x0, y0), (0.5 + cx + bend, cy - bend), (x2, y2)],
        width: rng.uniform(0.005, 0.009),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_a_pure_function_of_the_seed() {
        assert_eq!(FaceIdentity::from_seed(42), FaceIdentity::from_seed(42));
        assert_ne!(FaceIdentity::from_seed(42), FaceIdentity::from_seed(43));
    }

    #[test]
    fn layout_stays_inside_an_aligned_crop() {
        for seed in 0..500 {
            let id = FaceIdentity::from_seed(seed);
            assert!((0.38..0.45).contains(&id.eyes.y), "eyes {seed}");
            assert!(id.nose.base_y < id.mouth.y, "nose/mouth {seed}");
            assert!(
                id.mouth.y + id.mouth.lower < id.head.chin_y - 0.08,
                "chin {seed}"
            );
            assert!(id.head.chin_y <= 0.985, "chin {seed}");
            assert!(id.hair.hairline_y < id.eyes.y - 0.14, "hairline {seed}");
        }
    }

    #[test]
    fn every_hair_style_occurs() {
        let styles: std::collections::HashSet<HairStyle> = (0..400)
            .map(|seed| FaceIdentity::from_seed(seed).hair.style)
            .collect();
        assert_eq!(styles.len(), HairStyle::ALL.len());
    }
}
