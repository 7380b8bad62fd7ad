//! PNG encoding of decoded images, for the image API's `b64_json` / file responses.
//!
//! PNG is lossless, so the bytes a client decodes are exactly the bytes the VAE stage produced:
//! parity checks against diffusers can be made on the served file.

use super::DiffusionError;
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};
use omnistage_stages::RgbImages;

/// Encodes image `index` of `images` as an 8-bit RGB PNG (default compression, adaptive
/// filtering, no metadata). Errors when `index` is out of range, the size is empty or does not
/// fit PNG's 32-bit dimensions, or the pixel buffer is shorter than `n × height × width × 3`.
pub fn encode_png(images: &RgbImages, index: usize) -> Result<Vec<u8>, DiffusionError> {
    if index >= images.n {
        return Err(DiffusionError::Input(format!(
            "image index {index} out of range: the batch has {} images",
            images.n
        )));
    }
    let (width, height) = match (u32::try_from(images.width), u32::try_from(images.height)) {
        (Ok(w), Ok(h)) if w > 0 && h > 0 => (w, h),
        _ => {
            return Err(DiffusionError::Input(format!(
                "cannot encode a {}x{} image as PNG",
                images.width, images.height
            )))
        }
    };
    // Checked arithmetic: `RgbImages::image` would overflow (and panic) on absurd sizes.
    let pixels = images
        .height
        .checked_mul(images.width)
        .and_then(|p| p.checked_mul(3))
        .and_then(|size| Some((size, index.checked_mul(size)?)))
        .and_then(|(size, start)| images.pixels.get(start..start.checked_add(size)?))
        .ok_or_else(|| {
            DiffusionError::Input(format!(
                "image {index} is missing: {} pixel bytes for {} images of {}x{}",
                images.pixels.len(),
                images.n,
                images.width,
                images.height
            ))
        })?;
    let mut png = Vec::new();
    PngEncoder::new(&mut png)
        .write_image(pixels, width, height, ExtendedColorType::Rgb8)
        .map_err(|e| DiffusionError::Input(format!("PNG encoding failed: {e}")))?;
    Ok(png)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(n: usize, height: usize, width: usize) -> RgbImages {
        // Every byte differs from its neighbours so a channel or row mix-up would show.
        let pixels: Vec<u8> = (0..n * height * width * 3)
            .map(|i| (i * 37 % 251) as u8)
            .collect();
        RgbImages {
            pixels: pixels.into(),
            n,
            height,
            width,
        }
    }

    #[test]
    fn png_round_trips_exact_pixels() {
        let batch = images(3, 5, 7);
        for i in 0..3 {
            let png = encode_png(&batch, i).unwrap();
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
            let back = image::load_from_memory_with_format(&png, image::ImageFormat::Png)
                .unwrap()
                .into_rgb8();
            assert_eq!((back.width(), back.height()), (7, 5));
            assert_eq!(back.as_raw().as_slice(), batch.image(i).unwrap());
        }
    }

    #[test]
    fn bad_requests_are_errors_not_panics() {
        let batch = images(2, 4, 4);
        assert!(encode_png(&batch, 2).is_err());
        let empty = images(1, 0, 4);
        assert!(encode_png(&empty, 0).is_err());
        let short = RgbImages {
            pixels: vec![0u8; 10].into(),
            n: 1,
            height: 4,
            width: 4,
        };
        assert!(encode_png(&short, 0).is_err());
        let huge = RgbImages {
            pixels: vec![0u8; 10].into(),
            n: 2,
            height: 1 << 31,
            width: 1 << 31,
        };
        assert!(encode_png(&huge, 1).is_err());
    }
}
