//! Pixel-level helpers: base64 and PNG decoding, PSNR and channel differences, `.npy` output.

use std::path::Path;

pub(crate) fn rgb(png: &[u8]) -> image::RgbImage {
    image::load_from_memory(png).expect("decode PNG").to_rgb8()
}

/// PSNR in dB of `b` against `a` over RGB bytes (infinite when identical).
pub(crate) fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    let (pa, pb) = (a.as_raw(), b.as_raw());
    let se: f64 = pa
        .iter()
        .zip(pb)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum();
    let mse = se / pa.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// Largest per-channel difference, and how many channel values differ.
pub(crate) fn pixel_diff(a: &image::RgbImage, b: &image::RgbImage) -> (u8, usize) {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .fold((0u8, 0usize), |(m, n), (&x, &y)| {
            let d = x.abs_diff(y);
            (m.max(d), n + usize::from(d > 0))
        })
}

/// Writes `data` (`shape`, row-major f32) as a `.npy` file.
pub(crate) fn write_npy(path: &Path, shape: &[usize], data: &[f32]) {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let dims = if dims.len() == 1 {
        format!("{},", dims[0])
    } else {
        dims.join(", ")
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}), }}");
    // Magic (6) + version (2) + length (2) + header, padded to a multiple of 64 with a newline.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    for v in data {
        bytes.extend(v.to_le_bytes());
    }
    std::fs::write(path, bytes).expect("write npy");
}
