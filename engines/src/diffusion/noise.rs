//! Seeded Gaussian noise for initial latents: a pure function of (seed, image index), so a seeded
//! request gives the same image alone or batched with others, on any run.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Standard-normal samples for image `index` of a request seeded with `seed`.
///
/// Each image gets its own generator (seed mixed with the index by SplitMix64), so image 1 of a
/// request with `n = 2` equals image 1 however many images were asked for. Box–Muller in f64.
pub fn gaussian(seed: u64, index: u64, len: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(splitmix64(seed ^ splitmix64(index)));
    let mut out = Vec::with_capacity(len + 1);
    while out.len() < len {
        // u1 in (0, 1] so ln(u1) is finite.
        let u1: f64 = 1.0 - rng.gen::<f64>();
        let u2: f64 = rng.gen::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(len);
    out
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_distinct_and_standard_normal() {
        let a = gaussian(7, 0, 20_001);
        assert_eq!(a, gaussian(7, 0, 20_001));
        assert_ne!(a[..16], gaussian(7, 1, 16)[..]);
        assert_ne!(a[..16], gaussian(8, 0, 16)[..]);
        assert_eq!(a.len(), 20_001);
        let n = a.len() as f64;
        let mean = a.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = a
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
    }
}
