//! Deterministic scalar helpers.
//!
//! `f32::sin`/`f32::cos` defer to the platform's maths library, whose last
//! bits differ between systems. ProcFace promises byte-identical images on
//! any machine, so every trigonometric value it needs comes from the
//! polynomials below, which only use IEEE-754 `+`, `-` and `*`.

use std::f32::consts::{FRAC_PI_2, PI, TAU};

/// Sine from a Taylor polynomial after reducing `x` to `[-π/2, π/2]`.
pub(crate) fn sin(x: f32) -> f32 {
    let reduced = reduce_to_half_turn(x);
    let folded = if reduced > FRAC_PI_2 {
        PI - reduced
    } else if reduced < -FRAC_PI_2 {
        -PI - reduced
    } else {
        reduced
    };
    taylor_sin(folded)
}

/// Cosine as `sin(x + π/2)`.
pub(crate) fn cos(x: f32) -> f32 {
    sin(x + FRAC_PI_2)
}

/// Maps `x` into `[-π, π]` by removing whole turns.
fn reduce_to_half_turn(x: f32) -> f32 {
    let turns = (x / TAU).round();
    x - turns * TAU
}

/// Taylor series of `sin` up to `x^13`; accurate to ~1e-7 on `[-π/2, π/2]`.
fn taylor_sin(x: f32) -> f32 {
    let x2 = x * x;
    let mut term = x;
    let mut sum = x;
    for k in 1..=6 {
        let k = k as f32;
        term = -term * x2 / ((2.0 * k) * (2.0 * k + 1.0));
        sum += term;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trig_matches_std_closely() {
        let mut x = -10.0f32;
        while x < 10.0 {
            assert!((sin(x) - x.sin()).abs() < 2e-6, "sin({x})");
            assert!((cos(x) - x.cos()).abs() < 2e-6, "cos({x})");
            x += 0.0137;
        }
    }
}
