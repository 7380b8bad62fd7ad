//! Audio content parts: WAV (through `hound`) and MP3 (through `symphonia`) to mono f32 PCM at
//! the clip's own sample rate (the encoder stages resample to theirs).

use omnistage_stages::deploy::MediaLimits;
use omnistage_stages::MediaInput;
use std::io::Cursor;
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{Decoder as _, DecoderOptions};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::{FormatOptions, FormatReader as _};
use symphonia::core::io::{MediaSourceStream, MediaSourceStreamOptions};
use symphonia::default::codecs::MpaDecoder;
use symphonia::default::formats::MpaReader;

/// `input_audio.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioFormat {
    Wav,
    Mp3,
}

impl AudioFormat {
    /// The format a request names; an error listing the supported ones for any other.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "wav" => Ok(AudioFormat::Wav),
            "mp3" => Ok(AudioFormat::Mp3),
            other => Err(format!(
                "unsupported audio format `{other}`; use wav or mp3"
            )),
        }
    }
}

/// Decodes a clip to one mono [`MediaInput`] (channels averaged). Refused: more than
/// `max_audio_bytes`; data that is not the named format or is corrupt; a sample layout WAV
/// readers rarely meet; no samples; longer than `max_audio_seconds` (for WAV from the header,
/// before decoding; for MP3 as soon as decoding passes it).
pub fn decode_audio(
    bytes: Vec<u8>,
    format: AudioFormat,
    limits: &MediaLimits,
) -> Result<MediaInput, String> {
    if bytes.len() as u64 > limits.max_audio_bytes {
        return Err(format!(
            "the audio clip is {} bytes, over this deployment's limit of {} \
             (media.max_audio_bytes)",
            bytes.len(),
            limits.max_audio_bytes
        ));
    }
    let (samples, rate) = match format {
        AudioFormat::Wav => wav(&bytes, limits.max_audio_seconds)?,
        AudioFormat::Mp3 => mp3(bytes, limits.max_audio_seconds)?,
    };
    MediaInput::audio(samples, rate).ok_or_else(|| "the audio clip has no samples".to_string())
}

fn too_long(seconds: f64, max: f64) -> String {
    format!(
        "the audio clip is {seconds:.2} s long, over this deployment's limit of {max} s \
         (media.max_audio_seconds)"
    )
}

/// Averages interleaved frames of `channels` samples into `out`.
fn mix_down(interleaved: &[f32], channels: usize, out: &mut Vec<f32>) {
    if channels == 1 {
        out.extend_from_slice(interleaved);
        return;
    }
    let scale = 1.0 / channels as f32;
    out.extend(
        interleaved
            .chunks_exact(channels)
            .map(|f| f.iter().sum::<f32>() * scale),
    );
}

fn wav(bytes: &[u8], max_seconds: f64) -> Result<(Vec<f32>, u32), String> {
    let reader = hound::WavReader::new(Cursor::new(bytes))
        .map_err(|e| format!("the audio is not a valid WAV file: {e}"))?;
    let spec = reader.spec();
    let channels = usize::from(spec.channels);
    if channels == 0 || spec.sample_rate == 0 {
        return Err("the WAV file has no channels or a sample rate of 0".into());
    }
    let seconds = f64::from(reader.duration()) / f64::from(spec.sample_rate);
    if seconds > max_seconds {
        return Err(too_long(seconds, max_seconds));
    }
    let corrupt = |e: hound::Error| format!("the WAV data is corrupt: {e}");
    let interleaved: Vec<f32> = match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Int, bits @ (8 | 16 | 24 | 32)) => {
            let scale = 1.0 / (1u64 << (bits - 1)) as f32;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|s| s as f32 * scale))
                .collect::<Result<_, _>>()
                .map_err(corrupt)?
        }
        (hound::SampleFormat::Float, 32) => reader
            .into_samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(corrupt)?,
        (f, bits) => {
            let kind = match f {
                hound::SampleFormat::Int => "integer",
                hound::SampleFormat::Float => "float",
            };
            return Err(format!(
                "WAV files of {bits}-bit {kind} samples are not supported; \
                 use 8, 16, 24 or 32-bit integer or 32-bit float"
            ));
        }
    };
    let mut mono = Vec::with_capacity(interleaved.len() / channels);
    mix_down(&interleaved, channels, &mut mono);
    if mono.is_empty() {
        return Err("the audio clip has no samples".into());
    }
    Ok((mono, spec.sample_rate))
}

fn mp3(bytes: Vec<u8>, max_seconds: f64) -> Result<(Vec<f32>, u32), String> {
    let not_mp3 = |e: SymphoniaError| format!("the audio is not a valid MP3 file: {e}");
    let source = MediaSourceStream::new(
        Box::new(Cursor::new(bytes)),
        MediaSourceStreamOptions::default(),
    );
    let options = FormatOptions {
        // Trim the encoder's delay and padding (LAME/Xing tags), so the clip is as long as
        // what was encoded.
        enable_gapless: true,
        ..FormatOptions::default()
    };
    let mut reader = MpaReader::try_new(source, &options).map_err(not_mp3)?;
    let track = reader
        .default_track()
        .ok_or_else(|| "the audio is not a valid MP3 file: no audio track".to_string())?;
    let track_id = track.id;
    let mut decoder =
        MpaDecoder::try_new(&track.codec_params, &DecoderOptions::default()).map_err(not_mp3)?;
    let mut mono = Vec::new();
    let mut rate = 0u32;
    let mut buf: Option<SampleBuffer<f32>> = None;
    let mut last_error = None;
    loop {
        let packet = match reader.next_packet() {
            Ok(p) => p,
            // The end of the stream.
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break
            }
            Err(SymphoniaError::ResetRequired) => break,
            Err(e) => return Err(format!("the MP3 data is corrupt: {e}")),
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(d) => d,
            // A damaged frame: skipped, as players do.
            Err(SymphoniaError::DecodeError(e)) => {
                last_error = Some(e);
                continue;
            }
            Err(e) => return Err(format!("the MP3 data is corrupt: {e}")),
        };
        let spec = *decoded.spec();
        if rate != 0 && spec.rate != rate {
            return Err("the MP3 stream changes its sample rate midway".into());
        }
        rate = spec.rate;
        let channels = spec.channels.count().max(1);
        let frames = decoded.frames();
        let b = match &mut buf {
            Some(b) if b.capacity() >= frames * channels => b,
            _ => buf.insert(SampleBuffer::new(decoded.capacity() as u64, spec)),
        };
        b.copy_interleaved_ref(decoded);
        mix_down(b.samples(), channels, &mut mono);
        let seconds = mono.len() as f64 / f64::from(rate);
        if seconds > max_seconds {
            return Err(too_long(seconds, max_seconds));
        }
    }
    if mono.is_empty() {
        return Err(match last_error {
            Some(e) => format!("the MP3 data is corrupt: {e}"),
            None => "the audio clip has no samples".into(),
        });
    }
    Ok((mono, rate))
}

#[cfg(test)]
mod tests {
    use super::*;
    use omnistage_stages::MediaData;

    fn pcm(m: &MediaInput) -> (Vec<f32>, u32) {
        match &m.data {
            MediaData::Audio(a) => (a.samples.to_vec(), a.sample_rate),
            other => panic!("not audio: {other:?}"),
        }
    }

    fn wav_bytes(
        spec: hound::WavSpec,
        write: impl FnOnce(&mut hound::WavWriter<&mut Cursor<Vec<u8>>>),
    ) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        let mut w = hound::WavWriter::new(&mut out, spec).unwrap();
        write(&mut w);
        w.finalize().unwrap();
        out.into_inner()
    }

    fn int_spec(channels: u16, sample_rate: u32, bits: u16) -> hound::WavSpec {
        hound::WavSpec {
            channels,
            sample_rate,
            bits_per_sample: bits,
            sample_format: hound::SampleFormat::Int,
        }
    }

    #[test]
    fn stereo_16_bit_wav_mixes_to_mono_at_the_source_rate() {
        let bytes = wav_bytes(int_spec(2, 22_050, 16), |w| {
            for _ in 0..100 {
                w.write_sample(16_384i16).unwrap(); // left 0.5
                w.write_sample(-8_192i16).unwrap(); // right -0.25
            }
        });
        let m = decode_audio(bytes, AudioFormat::Wav, &MediaLimits::default()).unwrap();
        let (samples, rate) = pcm(&m);
        assert_eq!((samples.len(), rate), (100, 22_050));
        assert!(
            samples.iter().all(|s| (s - 0.125).abs() < 1e-6),
            "{:?}",
            &samples[..4]
        );
    }

    #[test]
    fn wav_of_every_integer_width_and_float_decodes() {
        for bits in [8u16, 24, 32] {
            let full = 1i64 << (bits - 1);
            let bytes = wav_bytes(int_spec(1, 8_000, bits), |w| {
                w.write_sample((full / 2) as i32).unwrap();
                w.write_sample((-full) as i32).unwrap();
            });
            let (s, rate) =
                pcm(&decode_audio(bytes, AudioFormat::Wav, &MediaLimits::default()).unwrap());
            assert_eq!((s, rate), (vec![0.5, -1.0], 8_000), "{bits}-bit");
        }
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 48_000,
            bits_per_sample: 32,
            sample_format: hound::SampleFormat::Float,
        };
        let bytes = wav_bytes(spec, |w| {
            for s in [0.25f32, -0.75, 1.0] {
                w.write_sample(s).unwrap();
            }
        });
        let (s, rate) =
            pcm(&decode_audio(bytes, AudioFormat::Wav, &MediaLimits::default()).unwrap());
        assert_eq!((s, rate), (vec![0.25, -0.75, 1.0], 48_000));
    }

    #[test]
    fn refuses_empty_long_big_and_broken_audio() {
        let limits = MediaLimits::default();
        let empty = wav_bytes(int_spec(1, 16_000, 16), |_| {});
        let e = decode_audio(empty, AudioFormat::Wav, &limits).unwrap_err();
        assert_eq!(e, "the audio clip has no samples");

        let two_seconds = wav_bytes(int_spec(1, 1_000, 16), |w| {
            for _ in 0..2_000 {
                w.write_sample(0i16).unwrap();
            }
        });
        let short = MediaLimits {
            max_audio_seconds: 1.5,
            ..MediaLimits::default()
        };
        let e = decode_audio(two_seconds.clone(), AudioFormat::Wav, &short).unwrap_err();
        assert!(
            e.contains("2.00 s long") && e.contains("media.max_audio_seconds"),
            "{e}"
        );

        let small = MediaLimits {
            max_audio_bytes: 100,
            ..MediaLimits::default()
        };
        let e = decode_audio(two_seconds, AudioFormat::Wav, &small).unwrap_err();
        assert!(e.contains("media.max_audio_bytes"), "{e}");

        let e = decode_audio(b"RIFF....not a wav".to_vec(), AudioFormat::Wav, &limits).unwrap_err();
        assert!(e.starts_with("the audio is not a valid WAV file"), "{e}");

        let mp3 = include_bytes!("../../tests/fixtures/tone-16k-mono.mp3").to_vec();
        let e = decode_audio(mp3, AudioFormat::Wav, &limits).unwrap_err();
        assert!(e.starts_with("the audio is not a valid WAV file"), "{e}");

        let e = decode_audio(vec![0x55; 3000], AudioFormat::Mp3, &limits).unwrap_err();
        assert!(e.contains("MP3"), "{e}");

        let e = AudioFormat::parse("flac").unwrap_err();
        assert_eq!(e, "unsupported audio format `flac`; use wav or mp3");
        assert_eq!(AudioFormat::parse("MP3").unwrap(), AudioFormat::Mp3);
    }

    #[test]
    fn mp3_decodes_to_the_encoded_length_and_rate() {
        // Made by tests/fixtures/make_mp3.py: 0.5 s and 0.25 s of a 440 Hz sine at half scale.
        let cases: [(&[u8], usize, u32); 2] = [
            (
                include_bytes!("../../tests/fixtures/tone-16k-mono.mp3"),
                8_000,
                16_000,
            ),
            (
                include_bytes!("../../tests/fixtures/tone-44k-stereo.mp3"),
                11_025,
                44_100,
            ),
        ];
        for (bytes, frames, want_rate) in cases {
            let m =
                decode_audio(bytes.to_vec(), AudioFormat::Mp3, &MediaLimits::default()).unwrap();
            let (s, rate) = pcm(&m);
            assert_eq!(rate, want_rate);
            // Every encoded sample comes back. `lameenc` writes no LAME/Info tag, so LAME's
            // encoder delay and end padding (together under three 1152-sample frames) stay in;
            // files with the tag (the `lame` tool's) come back trimmed to the exact length.
            assert!(
                (frames..frames + 3 * 1_152).contains(&s.len()),
                "{} samples, {frames} encoded",
                s.len()
            );
            let peak = s.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!((0.4..0.6).contains(&peak), "peak {peak}");
        }
        let short = MediaLimits {
            max_audio_seconds: 0.1,
            ..MediaLimits::default()
        };
        let mono = include_bytes!("../../tests/fixtures/tone-16k-mono.mp3").to_vec();
        let e = decode_audio(mono, AudioFormat::Mp3, &short).unwrap_err();
        assert!(e.contains("media.max_audio_seconds"), "{e}");
    }
}
