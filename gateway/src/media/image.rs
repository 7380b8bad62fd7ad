//! Image content parts: PNG, JPEG and WebP bytes to RGB8 pixels.

use image::{ImageFormat, ImageReader, Limits};
use omnistage_stages::deploy::MediaLimits;
use omnistage_stages::MediaInput;
use std::io::Cursor;

/// The formats a chat image may come in.
const SUPPORTED: &str = "image/png, image/jpeg or image/webp";

/// The format a media type (a data: URI's, or a fetched response's `content-type`) names; an
/// error for any other type.
pub fn image_media_type(media_type: &str) -> Result<ImageFormat, String> {
    let essence = media_type.split(';').next().unwrap_or("").trim();
    match essence.to_ascii_lowercase().as_str() {
        "image/png" => Ok(ImageFormat::Png),
        "image/jpeg" | "image/jpg" | "image/pjpeg" => Ok(ImageFormat::Jpeg),
        "image/webp" => Ok(ImageFormat::WebP),
        other => Err(format!(
            "images of type `{other}` are not supported; send {SUPPORTED}"
        )),
    }
}

fn name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Png => "PNG",
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Gif => "GIF",
        ImageFormat::Bmp => "BMP",
        ImageFormat::Tiff => "TIFF",
        ImageFormat::Ico => "ICO",
        ImageFormat::Avif => "AVIF",
        ImageFormat::Qoi => "QOI",
        ImageFormat::Hdr => "HDR",
        ImageFormat::OpenExr => "OpenEXR",
        _ => "another format's",
    }
}

/// Decodes an encoded image to one RGB8 [`MediaInput`] (alpha dropped, 16-bit and float
/// channels scaled down). `declared` is the format the request said it is, if it said.
///
/// Refused, cheapest check first: more than `max_image_bytes`; bytes that are no PNG, JPEG or
/// WebP, or not the declared one; a header with more than `max_image_pixels` pixels (read from
/// the header alone, so a decompression bomb costs nothing); then corrupt data.
pub fn decode_image(
    bytes: &[u8],
    declared: Option<ImageFormat>,
    limits: &MediaLimits,
) -> Result<MediaInput, String> {
    if bytes.is_empty() {
        return Err("the image data is empty".into());
    }
    if bytes.len() as u64 > limits.max_image_bytes {
        return Err(format!(
            "the image is {} bytes, over this deployment's limit of {} (media.max_image_bytes)",
            bytes.len(),
            limits.max_image_bytes
        ));
    }
    let reader = || -> Result<ImageReader<Cursor<&[u8]>>, String> {
        let r = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| format!("cannot read the image: {e}"))?;
        Ok(r)
    };
    let first = reader()?;
    let format = match first.format() {
        Some(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => f,
        Some(f) => {
            return Err(format!(
                "the data is a {} image, which is not supported; send {SUPPORTED}",
                name(f)
            ))
        }
        None => {
            return Err(format!(
                "the data is not an image in a supported format ({SUPPORTED})"
            ))
        }
    };
    if let Some(d) = declared.filter(|d| *d != format) {
        return Err(format!(
            "the data is a {} image but its media type says {}",
            name(format),
            d.to_mime_type()
        ));
    }
    let corrupt = |e: image::ImageError| format!("the {} image is corrupt: {e}", name(format));
    let (w, h) = first.into_dimensions().map_err(corrupt)?;
    let pixels = u64::from(w) * u64::from(h);
    if pixels > limits.max_image_pixels {
        return Err(format!(
            "the image is {w}x{h} ({pixels} pixels), over this deployment's limit of {} pixels \
             (media.max_image_pixels)",
            limits.max_image_pixels
        ));
    }
    if pixels == 0 {
        return Err("the image has no pixels".into());
    }
    let mut r = reader()?;
    let mut l = Limits::default();
    l.max_image_width = Some(w);
    l.max_image_height = Some(h);
    // The decoded buffer (up to 4 channels of f32) plus the decoders' working memory.
    l.max_alloc = Some(pixels * 16 + (64 << 20));
    r.limits(l);
    let rgb = r.decode().map_err(corrupt)?.into_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    MediaInput::image(rgb.into_raw(), w, h).ok_or_else(|| "the image has no pixels".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, RgbImage, RgbaImage};
    use omnistage_stages::MediaData;

    /// A 4×3 test picture: red, green, blue and grey columns.
    fn picture() -> RgbImage {
        let colors = [[250, 10, 10], [10, 250, 10], [10, 10, 250], [128, 128, 128]];
        RgbImage::from_fn(4, 3, |x, _| image::Rgb(colors[x as usize]))
    }

    fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), format).unwrap();
        out
    }

    fn rgb(m: &MediaInput) -> (usize, usize, Vec<u8>) {
        match &m.data {
            MediaData::Image(i) => (i.width, i.height, i.pixels.to_vec()),
            other => panic!("not an image: {other:?}"),
        }
    }

    #[test]
    fn lossless_formats_round_trip_exactly() {
        let want = picture();
        for format in [ImageFormat::Png, ImageFormat::WebP] {
            let bytes = encode(&want, format);
            let m = decode_image(&bytes, Some(format), &MediaLimits::default()).unwrap();
            assert_eq!(rgb(&m), (4, 3, want.as_raw().clone()), "{format:?}");
            // Undeclared formats are recognised from the bytes; same pixels, same digest.
            let again = decode_image(&bytes, None, &MediaLimits::default()).unwrap();
            assert_eq!(again.digest, m.digest);
        }
    }

    #[test]
    fn jpeg_decodes_to_nearly_the_same_colors() {
        let want = picture();
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 100)
            .write_image(want.as_raw(), 4, 3, image::ExtendedColorType::Rgb8)
            .unwrap();
        let m = decode_image(&bytes, Some(ImageFormat::Jpeg), &MediaLimits::default()).unwrap();
        let (w, h, got) = rgb(&m);
        assert_eq!((w, h), (4, 3));
        let worst = got
            .iter()
            .zip(want.as_raw())
            .map(|(a, b)| (i16::from(*a) - i16::from(*b)).abs())
            .max()
            .unwrap();
        assert!(worst < 40, "JPEG off by {worst}");
    }

    #[test]
    fn alpha_is_dropped() {
        let img = RgbaImage::from_pixel(2, 2, image::Rgba([1, 2, 3, 0]));
        let mut bytes = Vec::new();
        img.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .unwrap();
        let m = decode_image(&bytes, None, &MediaLimits::default()).unwrap();
        assert_eq!(rgb(&m), (2, 2, [1, 2, 3].repeat(4)));
    }

    #[test]
    fn refuses_corrupt_mislabelled_and_unsupported_images() {
        let limits = MediaLimits::default();
        let png = encode(&picture(), ImageFormat::Png);
        let mut cut = png[..png.len() - 30].to_vec();
        cut.extend_from_slice(&[0; 8]);
        let e = decode_image(&cut, None, &limits).unwrap_err();
        assert!(e.starts_with("the PNG image is corrupt"), "{e}");

        let e = decode_image(&png, Some(ImageFormat::Jpeg), &limits).unwrap_err();
        assert_eq!(
            e,
            "the data is a PNG image but its media type says image/jpeg"
        );

        let gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";
        let e = decode_image(gif, None, &limits).unwrap_err();
        assert!(e.contains("GIF image, which is not supported"), "{e}");

        let e =
            decode_image(b"<svg xmlns='http://www.w3.org/2000/svg'/>", None, &limits).unwrap_err();
        assert!(e.contains("not an image in a supported format"), "{e}");

        let e = image_media_type("image/gif").unwrap_err();
        assert!(e.contains("`image/gif` are not supported"), "{e}");
        assert!(image_media_type("image/svg+xml").is_err());
        assert_eq!(image_media_type("image/JPEG").unwrap(), ImageFormat::Jpeg);
    }

    #[test]
    fn refuses_too_many_bytes() {
        let png = encode(&picture(), ImageFormat::Png);
        let limits = MediaLimits {
            max_image_bytes: png.len() as u64 - 1,
            ..MediaLimits::default()
        };
        let e = decode_image(&png, None, &limits).unwrap_err();
        assert!(e.contains("media.max_image_bytes"), "{e}");
    }

    /// CRC-32 (IEEE), as PNG chunks use.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn refuses_too_many_pixels_from_the_header() {
        // A small PNG whose header claims 60000 × 60000 (10.8 GB of RGB if decoded).
        let mut png = encode(&picture(), ImageFormat::Png);
        // Signature (8), IHDR length (4) and type (4), then width and height.
        png[16..20].copy_from_slice(&60_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&60_000u32.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = decode_image(&png, None, &MediaLimits::default()).unwrap_err();
        assert!(e.contains("60000x60000"), "{e}");
        assert!(e.contains("media.max_image_pixels"), "{e}");

        let small = encode(&picture(), ImageFormat::Png);
        let limits = MediaLimits {
            max_image_pixels: 11,
            ..MediaLimits::default()
        };
        let e = decode_image(&small, None, &limits).unwrap_err();
        assert!(e.contains("4x3 (12 pixels)"), "{e}");
    }
}
