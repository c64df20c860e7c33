//! Scalar math the host paths share, written so that the compiler vectorizes loops over it.

/// `e^x` for `x ≤ 0` (0 below −87, where f32 underflows), within 2·10⁻⁷ of `f32::exp`: a
/// polynomial the compiler vectorizes, where `f32::exp` is a library call per value (the
/// sampler's tempered weights over a 50,000-token vocabulary, the CPU attention's softmax).
#[inline]
pub fn exp_nonpositive(x: f32) -> f32 {
    // e^x = 2^n · e^r with n = round(x / ln 2) and r = x − n·ln 2 ∈ [−½ ln 2, ½ ln 2] (ln 2 in
    // two parts, so r is exact to f32); e^r by its Taylor series to degree 7 (error below 10⁻⁸).
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding and subtracting it rounds to an integer
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = if x < -87.0 { -87.0 } else { x };
    let k = xc * std::f32::consts::LOG2_E + ROUND;
    let n = k - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n as an integer without a conversion: k's low mantissa bits hold it (offset by ROUND's).
    #[expect(clippy::cast_possible_wrap, clippy::cast_sign_loss, reason = "bit patterns")]
    let scale = f32::from_bits(((k.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23) as u32);
    if x < -87.0 { 0.0 } else { p * scale }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_exponential_matches_the_library_one() {
        let mut worst = 0f32;
        for i in 0..=870_000 {
            #[expect(clippy::cast_precision_loss, reason = "a test grid")]
            let x = -(i as f32) * 1e-4;
            let (got, want) = (exp_nonpositive(x), x.exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(-88.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }
}
