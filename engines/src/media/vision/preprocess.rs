//! `CLIPImageProcessor` / `SiglipImageProcessor` (Transformers' PIL backend) in Rust: resize,
//! center crop, rescale, normalise, to channels-first f32.
//!
//! The resize is a port of Pillow's `ImagingResample` for 8-bit images (`libImaging/Resample.c`):
//! the same filters and supports (scaled by the reduction factor, i.e. antialiased when
//! shrinking), the same fixed-point coefficients (22 fractional bits), a horizontal pass rounded
//! to `u8` and then a vertical pass. It reproduces Pillow's output; the `image` crate's resize
//! (f32, vertical pass first, no intermediate rounding) differs from it by a few levels.
//!
//! Rescaling is done in f64 and cast to f32, normalising in f32, as Transformers does.

use super::config::{PreprocessConfig, Resample, ResizeTo};

/// An RGB image, `height × width × 3` bytes, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// Fractional bits of Pillow's fixed-point coefficients (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

fn filter(kind: Resample, x: f64) -> f64 {
    match kind {
        Resample::Box => {
            if x > -0.5 && x <= 0.5 {
                1.0
            } else {
                0.0
            }
        }
        Resample::Bilinear => {
            let x = x.abs();
            if x < 1.0 {
                1.0 - x
            } else {
                0.0
            }
        }
        Resample::Hamming => {
            let x = x.abs();
            if x == 0.0 {
                1.0
            } else if x >= 1.0 {
                0.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
            }
        }
        Resample::Bicubic => {
            let a = -0.5;
            let x = x.abs();
            if x < 1.0 {
                ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                (((x - 5.0) * x + 8.0) * x - 4.0) * a
            } else {
                0.0
            }
        }
        Resample::Lanczos => {
            if (-3.0..3.0).contains(&x) {
                sinc(x) * sinc(x / 3.0)
            } else {
                0.0
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn support(kind: Resample) -> f64 {
    match kind {
        Resample::Box => 0.5,
        Resample::Bilinear | Resample::Hamming => 1.0,
        Resample::Bicubic => 2.0,
        Resample::Lanczos => 3.0,
    }
}

/// Per output pixel: the first input pixel and fixed-point weights (Pillow's
/// `precompute_coeffs` + `normalize_coeffs_8bpc`).
fn coeffs(in_size: usize, out_size: usize, kind: Resample) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support(kind) * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's `(int)` truncates toward zero; both bounds are then clamped.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin);
            let w: Vec<f64> = (0..n)
                .map(|x| filter(kind, ((x + xmin) as f64 - center + 0.5) * ss))
                .collect();
            let ww: f64 = w.iter().sum();
            let one = f64::from(1u32 << PRECISION_BITS);
            let k = w
                .iter()
                .map(|&w| {
                    let w = if ww != 0.0 { w / ww } else { w };
                    if w < 0.0 {
                        (-0.5 + w * one) as i32
                    } else {
                        (0.5 + w * one) as i32
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `Image.resize((width, height), resample)` on an RGB image.
pub fn resize(img: &Rgb8, width: usize, height: usize, kind: Resample) -> Rgb8 {
    let mut cur = img.clone();
    if width != cur.width {
        let cs = coeffs(cur.width, width, kind);
        let mut out = vec![0u8; cur.height * width * 3];
        for y in 0..cur.height {
            let row = &cur.pixels[y * cur.width * 3..(y + 1) * cur.width * 3];
            for (xx, (xmin, k)) in cs.iter().enumerate() {
                let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
                for (i, &w) in k.iter().enumerate() {
                    let p = &row[(xmin + i) * 3..(xmin + i) * 3 + 3];
                    for c in 0..3 {
                        acc[c] += i64::from(p[c]) * i64::from(w);
                    }
                }
                for c in 0..3 {
                    out[(y * width + xx) * 3 + c] = clip8(acc[c]);
                }
            }
        }
        cur = Rgb8 {
            width,
            height: cur.height,
            pixels: out,
        };
    }
    if height != cur.height {
        let cs = coeffs(cur.height, height, kind);
        let w3 = cur.width * 3;
        let mut out = vec![0u8; height * w3];
        for (yy, (ymin, k)) in cs.iter().enumerate() {
            for x in 0..w3 {
                let mut acc = 1i64 << (PRECISION_BITS - 1);
                for (i, &w) in k.iter().enumerate() {
                    acc += i64::from(cur.pixels[(ymin + i) * w3 + x]) * i64::from(w);
                }
                out[yy * w3 + x] = clip8(acc);
            }
        }
        cur = Rgb8 {
            width: cur.width,
            height,
            pixels: out,
        };
    }
    cur
}

/// Transformers' `center_crop`: the window starts at `⌊(orig − crop) / 2⌋` on each axis; parts
/// outside the image (a crop larger than the image) are zero.
pub fn center_crop(img: &Rgb8, height: usize, width: usize) -> Rgb8 {
    let top = (img.height as i64 - height as i64).div_euclid(2);
    let left = (img.width as i64 - width as i64).div_euclid(2);
    let mut out = vec![0u8; height * width * 3];
    for y in 0..height {
        let sy = y as i64 + top;
        if sy < 0 || sy >= img.height as i64 {
            continue;
        }
        for x in 0..width {
            let sx = x as i64 + left;
            if sx < 0 || sx >= img.width as i64 {
                continue;
            }
            let src = (sy as usize * img.width + sx as usize) * 3;
            let dst = (y * width + x) * 3;
            out[dst..dst + 3].copy_from_slice(&img.pixels[src..src + 3]);
        }
    }
    Rgb8 {
        width,
        height,
        pixels: out,
    }
}

/// The size `{"shortest_edge": n}` resizes a `height × width` image to, as Transformers'
/// `get_resize_output_image_size(default_to_square=False)`: `(height, width)`.
pub fn shortest_edge_size(height: usize, width: usize, n: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = ((n as f64 * long as f64) / short as f64) as usize;
    if width <= height {
        (new_long, n)
    } else {
        (n, new_long)
    }
}

/// Runs the processor on one image: channels-first `3 × H × W` f32 values and `(H, W)`.
pub fn preprocess(cfg: &PreprocessConfig, img: &Rgb8) -> (Vec<f32>, (usize, usize)) {
    let mut cur = std::borrow::Cow::Borrowed(img);
    if let Some(r) = cfg.resize {
        let (h, w) = match r {
            ResizeTo::ShortestEdge(n) => shortest_edge_size(cur.height, cur.width, n),
            ResizeTo::Exact { height, width } => (height, width),
        };
        let (h, w) = (h.max(1), w.max(1));
        if (h, w) != (cur.height, cur.width) {
            cur = std::borrow::Cow::Owned(resize(&cur, w, h, cfg.resample));
        }
    }
    if let Some((h, w)) = cfg.crop {
        cur = std::borrow::Cow::Owned(center_crop(&cur, h, w));
    }
    let (h, w) = (cur.height, cur.width);
    let plane = h * w;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in cur.pixels.chunks_exact(3).enumerate() {
        for c in 0..3 {
            let mut v = match cfg.rescale {
                Some(s) => (f64::from(px[c]) * s) as f32,
                None => f32::from(px[c]),
            };
            if let Some((mean, std)) = cfg.normalize {
                v = (v - mean[c]) / std[c];
            }
            out[c * plane + i] = v;
        }
    }
    (out, (h, w))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(width: usize, height: usize) -> Rgb8 {
        let pixels = (0..height * width * 3)
            .map(|i| ((i * 37) % 251) as u8)
            .collect();
        Rgb8 {
            width,
            height,
            pixels,
        }
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for kind in [
            Resample::Bilinear,
            Resample::Bicubic,
            Resample::Lanczos,
            Resample::Box,
            Resample::Hamming,
        ] {
            for (i, o) in [(28, 32), (45, 32), (7, 3), (3, 7), (1, 5)] {
                for (_, k) in coeffs(i, o, kind) {
                    let s: i64 = k.iter().map(|&w| i64::from(w)).sum();
                    assert!(
                        (s - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                        "{kind:?} {s}"
                    );
                }
            }
        }
    }

    #[test]
    fn constant_images_stay_constant_and_identity_is_exact() {
        let img = Rgb8 {
            width: 9,
            height: 5,
            pixels: vec![200; 9 * 5 * 3],
        };
        let r = resize(&img, 17, 3, Resample::Bicubic);
        assert!(r.pixels.iter().all(|&p| p == 200));
        let img = ramp(6, 4);
        assert_eq!(resize(&img, 6, 4, Resample::Bicubic), img);
    }

    #[test]
    fn crop_pads_with_zeros_and_centers() {
        let img = ramp(5, 3);
        let c = center_crop(&img, 3, 3);
        assert_eq!(&c.pixels[0..3], &img.pixels[3..6]);
        let p = center_crop(&img, 5, 5);
        // One zero row above (⌊(3 − 5) / 2⌋ = −1).
        assert!(p.pixels[..15].iter().all(|&v| v == 0));
        assert_eq!(&p.pixels[15..30], &img.pixels[..15]);
    }

    #[test]
    fn shortest_edge_keeps_aspect() {
        assert_eq!(shortest_edge_size(28, 40, 32), (32, 45));
        assert_eq!(shortest_edge_size(40, 28, 32), (45, 32));
        assert_eq!(shortest_edge_size(10, 10, 4), (4, 4));
    }
}
