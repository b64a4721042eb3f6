//! Colour arithmetic and the palettes identities are drawn from.

use tiny_skia::Color;

/// Linear-ish working colour with channels in `[0, 1]` (sRGB encoded).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Rgb {
    pub r: f32,
    pub g: f32,
    pub b: f32,
}

impl Rgb {
    pub const BLACK: Rgb = Rgb::new(0.0, 0.0, 0.0);
    pub const WHITE: Rgb = Rgb::new(1.0, 1.0, 1.0);

    pub const fn new(r: f32, g: f32, b: f32) -> Self {
        Rgb { r, g, b }
    }

    /// From 8-bit sRGB.
    pub fn from_u8(c: [u8; 3]) -> Self {
        Rgb::new(
            c[0] as f32 / 255.0,
            c[1] as f32 / 255.0,
            c[2] as f32 / 255.0,
        )
    }

    /// To 8-bit sRGB, rounding to nearest.
    pub fn to_u8(self) -> [u8; 3] {
        let q = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
        [q(self.r), q(self.g), q(self.b)]
    }

    /// `self` blended towards `other` by `t`.
    pub fn mix(self, other: Rgb, t: f32) -> Rgb {
        Rgb::new(
            self.r + (other.r - self.r) * t,
            self.g + (other.g - self.g) * t,
            self.b + (other.b - self.b) * t,
        )
    }

    /// Every channel multiplied by `f` (darkens for `f < 1`).
    pub fn scale(self, f: f32) -> Rgb {
        Rgb::new(
            (self.r * f).min(1.0),
            (self.g * f).min(1.0),
            (self.b * f).min(1.0),
        )
    }

    /// Blend towards white by `t`.
    pub fn lighten(self, t: f32) -> Rgb {
        self.mix(Rgb::WHITE, t)
    }

    /// Blend towards black by `t`.
    pub fn darken(self, t: f32) -> Rgb {
        self.mix(Rgb::BLACK, t)
    }

    /// Perceived brightness (Rec. 601 weights).
    pub fn luma(self) -> f32 {
        0.299 * self.r + 0.587 * self.g + 0.114 * self.b
    }

    /// tiny-skia colour with the given opacity.
    pub fn with_alpha(self, alpha: f32) -> Color {
        Color::from_rgba(
            self.r.clamp(0.0, 1.0),
            self.g.clamp(0.0, 1.0),
            self.b.clamp(0.0, 1.0),
            alpha.clamp(0.0, 1.0),
        )
        .unwrap_or(Color::BLACK)
    }

    /// Colour from hue (turns, `[0, 1)`), saturation and value.
    pub fn from_hsv(hue: f32, sat: f32, val: f32) -> Rgb {
        let h = (hue - hue.floor()) * 6.0;
        let sector = h.floor();
        let f = h - sector;
        let p = val * (1.0 - sat);
        let q = val * (1.0 - sat * f);
        let t = val * (1.0 - sat * (1.0 - f));
        match sector as u32 {
            0 => Rgb::new(val, t, p),
            1 => Rgb::new(q, val, p),
            2 => Rgb::new(p, val, t),
            3 => Rgb::new(p, q, val),
            4 => Rgb::new(t, p, val),
            _ => Rgb::new(val, p, q),
        }
    }
}

/// Skin tones from very light to very dark; identities interpolate along it.
pub(crate) const SKIN_RAMP: [[u8; 3]; 8] = [
    [250, 222, 204],
    [240, 198, 170],
    [226, 176, 142],
    [204, 146, 110],
    [176, 120, 84],
    [144, 94, 64],
    [108, 68, 46],
    [74, 47, 34],
];

/// Sample the skin ramp at `t ∈ [0, 1]`.
pub(crate) fn skin_ramp(t: f32) -> Rgb {
    let pos = t.clamp(0.0, 1.0) * (SKIN_RAMP.len() - 1) as f32;
    let lo = (pos.floor() as usize).min(SKIN_RAMP.len() - 2);
    let frac = pos - lo as f32;
    Rgb::from_u8(SKIN_RAMP[lo]).mix(Rgb::from_u8(SKIN_RAMP[lo + 1]), frac)
}

/// Natural (and a few dyed) hair colours with their sampling weights.
pub(crate) const HAIR_COLOURS: [([u8; 3], f32); 12] = [
    ([24, 20, 20], 3.0),    // black
    ([52, 36, 28], 3.0),    // dark brown
    ([92, 60, 38], 2.5),    // brown
    ([138, 98, 62], 1.5),   // light brown
    ([176, 140, 88], 1.2),  // dark blonde
    ([218, 190, 128], 1.0), // blonde
    ([236, 226, 196], 0.4), // platinum
    ([116, 48, 28], 0.8),   // auburn
    ([184, 84, 40], 0.8),   // ginger
    ([146, 144, 142], 0.8), // grey
    ([226, 224, 220], 0.4), // white
    ([70, 70, 150], 0.3),   // dyed blue
];

/// Iris colours with their sampling weights.
pub(crate) const EYE_COLOURS: [([u8; 3], f32); 7] = [
    ([58, 34, 20], 3.0),    // dark brown
    ([102, 62, 30], 2.0),   // brown
    ([128, 100, 52], 1.0),  // hazel
    ([84, 116, 66], 0.8),   // green
    ([74, 118, 172], 1.0),  // blue
    ([116, 128, 140], 0.6), // grey
    ([124, 164, 204], 0.5), // light blue
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_u8() {
        let c = [12, 200, 99];
        assert_eq!(Rgb::from_u8(c).to_u8(), c);
    }

    #[test]
    fn skin_ramp_ends() {
        assert_eq!(skin_ramp(0.0).to_u8(), SKIN_RAMP[0]);
        assert_eq!(skin_ramp(1.0).to_u8(), SKIN_RAMP[7]);
    }

    #[test]
    fn hsv_primaries() {
        assert_eq!(Rgb::from_hsv(0.0, 1.0, 1.0).to_u8(), [255, 0, 0]);
        assert_eq!(Rgb::from_hsv(1.0 / 3.0, 1.0, 1.0).to_u8(), [0, 255, 0]);
    }
}
