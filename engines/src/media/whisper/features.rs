//! Whisper's front end: resampling to the model's rate, and the log-mel spectrogram exactly as
//! Hugging Face's `WhisperFeatureExtractor` computes it.
//!
//! The log-mel of one window (`n_samples` samples, the clip padded with `padding_value`):
//! a centred STFT (reflect padding of `n_fft / 2` at both ends, periodic Hann window, hop
//! `hop_length`; the extra last frame dropped, leaving `nb_max_frames`), power spectrum, the
//! Slaney mel filter bank (`mel_filter_bank(1 + n_fft/2, feature_size, 0, 8000, sampling_rate,
//! norm="slaney", mel_scale="slaney")`, 8000 Hz being what the extractor hard-codes), then
//! `log10(max(mel, 1e-10))`, a floor at the window's maximum minus 8, and `(x + 4) / 4`.
//! Computed in f64 here (Transformers' torch path works in f32: the two agree to ~2e-5).
//!
//! candle-transformers' `whisper::audio::pcm_to_mel` is not used: it follows whisper.cpp, whose
//! frames are not centred (shifted by `n_fft / 2` samples against the extractor's) and whose
//! power spectrum doubles every bin but DC and Nyquist, and it hard-codes `n_fft` 400 and hop
//! 160. Measured on the test fixture's 1 s clip, its features differ from the extractor's by up
//! to 1.45 (tests/whisper_encoder.rs, `candle_pcm_to_mel_is_not_the_extractor`).

use rayon::prelude::*;
use rubato::{FftFixedInOut, Resampler};

use super::config::FeatureConfig;

/// Upper edge of the mel filter bank, as `WhisperFeatureExtractor` hard-codes it.
const MEL_MAX_HZ: f64 = 8000.0;

/// Input samples per resampler chunk, before rounding to whole `from / gcd` blocks.
const RESAMPLE_CHUNK: usize = 4096;

/// A mixed-radix FFT of one fixed size (recursive decimation in time over the prime factors
/// of the size; prime factors are done as direct DFTs).
#[derive(Debug, Clone)]
struct Fft {
    n: usize,
    factors: Vec<usize>,
    /// `exp(-2πi j / n)` for `j` in `0..n`.
    twiddles: Vec<(f64, f64)>,
}

impl Fft {
    fn new(n: usize) -> Self {
        let mut factors = Vec::new();
        let mut m = n;
        let mut p = 2;
        while m > 1 {
            if p * p > m {
                factors.push(m);
                break;
            }
            while m % p == 0 {
                factors.push(p);
                m /= p;
            }
            p += 1;
        }
        let twiddles = (0..n)
            .map(|j| {
                let a = -std::f64::consts::TAU * j as f64 / n as f64;
                (a.cos(), a.sin())
            })
            .collect();
        Self {
            n,
            factors,
            twiddles,
        }
    }

    /// The DFT of the real `input` (length `n`), as complex pairs.
    fn forward(&self, input: &[f64]) -> Vec<(f64, f64)> {
        let mut out = vec![(0.0, 0.0); self.n];
        let mut scratch = vec![(0.0, 0.0); self.n];
        self.rec(input, 0, 1, self.n, &self.factors, &mut out, &mut scratch);
        out
    }

    /// DFT of `input[offset + stride·i]`, `i < n`, into `out[..n]`.
    #[allow(clippy::too_many_arguments)]
    fn rec(
        &self,
        input: &[f64],
        offset: usize,
        stride: usize,
        n: usize,
        factors: &[usize],
        out: &mut [(f64, f64)],
        scratch: &mut [(f64, f64)],
    ) {
        let Some((&p, rest)) = factors.split_first() else {
            out[0] = (input[offset], 0.0);
            return;
        };
        let m = n / p;
        // Sub-transforms of the p decimated sequences, into out[r·m..(r+1)·m].
        for r in 0..p {
            let (o, s) = (
                &mut out[r * m..(r + 1) * m],
                &mut scratch[r * m..(r + 1) * m],
            );
            self.rec(input, offset + r * stride, stride * p, m, rest, o, s);
        }
        // Butterflies: X[k + q·m] = Σ_r W_n^{r(k + q·m)} Y_r[k].
        let tw_step = self.n / n;
        for k in 0..m {
            for q in 0..p {
                let kk = k + q * m;
                let (mut re, mut im) = out[k];
                for r in 1..p {
                    let (yr, yi) = out[r * m + k];
                    let (wr, wi) = self.twiddles[(r * kk % n) * tw_step];
                    re += yr * wr - yi * wi;
                    im += yr * wi + yi * wr;
                }
                scratch[kk] = (re, im);
            }
        }
        out[..n].copy_from_slice(&scratch[..n]);
    }
}

fn hz_to_mel_slaney(hz: f64) -> f64 {
    let (min_log_hz, min_log_mel) = (1000.0, 15.0);
    let logstep = 27.0 / 6.4f64.ln();
    if hz >= min_log_hz {
        min_log_mel + (hz / min_log_hz).ln() * logstep
    } else {
        3.0 * hz / 200.0
    }
}

fn mel_to_hz_slaney(mel: f64) -> f64 {
    let (min_log_hz, min_log_mel) = (1000.0, 15.0);
    let logstep = 6.4f64.ln() / 27.0;
    if mel >= min_log_mel {
        min_log_hz * (logstep * (mel - min_log_mel)).exp()
    } else {
        200.0 * mel / 3.0
    }
}

/// `numpy.linspace(start, stop, num)`.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| start + i as f64 * step).collect();
    v[num - 1] = stop;
    v
}

/// Transformers' `audio_utils.mel_filter_bank` with Slaney scale and Slaney norm, as
/// `[num_mel_filters][num_frequency_bins]` rows.
pub fn mel_filter_bank(
    num_frequency_bins: usize,
    num_mel_filters: usize,
    min_frequency: f64,
    max_frequency: f64,
    sampling_rate: usize,
) -> Vec<Vec<f64>> {
    let mel_freqs = linspace(
        hz_to_mel_slaney(min_frequency),
        hz_to_mel_slaney(max_frequency),
        num_mel_filters + 2,
    );
    let filter_freqs: Vec<f64> = mel_freqs.iter().map(|&m| mel_to_hz_slaney(m)).collect();
    let fft_freqs = linspace(0.0, (sampling_rate / 2) as f64, num_frequency_bins);
    (0..num_mel_filters)
        .map(|j| {
            let (lo, mid, hi) = (filter_freqs[j], filter_freqs[j + 1], filter_freqs[j + 2]);
            let enorm = 2.0 / (hi - lo);
            fft_freqs
                .iter()
                .map(|&f| {
                    let down = (f - lo) / (mid - lo);
                    let up = (hi - f) / (hi - mid);
                    down.min(up).max(0.0) * enorm
                })
                .collect()
        })
        .collect()
}

/// The log-mel front end of one checkpoint.
#[derive(Debug, Clone)]
pub struct LogMel {
    cfg: FeatureConfig,
    /// Periodic Hann window of `n_fft` points.
    window: Vec<f64>,
    /// Each filter's first non-zero bin and its weights from there.
    filters: Vec<(usize, Vec<f64>)>,
    fft: Fft,
}

impl LogMel {
    /// The front end `cfg` describes.
    pub fn new(cfg: &FeatureConfig) -> Self {
        let n_fft = cfg.n_fft;
        let window = (0..n_fft)
            .map(|i| 0.5 - 0.5 * (std::f64::consts::TAU * i as f64 / n_fft as f64).cos())
            .collect();
        let bank = mel_filter_bank(
            1 + n_fft / 2,
            cfg.feature_size,
            0.0,
            MEL_MAX_HZ,
            cfg.sampling_rate,
        );
        let filters = bank
            .into_iter()
            .map(|row| {
                let first = row.iter().position(|&w| w != 0.0).unwrap_or(0);
                let last = row.iter().rposition(|&w| w != 0.0).map_or(first, |l| l + 1);
                (first, row[first..last].to_vec())
            })
            .collect();
        Self {
            cfg: cfg.clone(),
            window,
            filters,
            fft: Fft::new(n_fft),
        }
    }

    /// The filter bank as `[feature_size][1 + n_fft/2]` rows (for comparisons and tests).
    pub fn filters(&self) -> Vec<Vec<f64>> {
        let bins = 1 + self.cfg.n_fft / 2;
        self.filters
            .iter()
            .map(|(first, w)| {
                let mut row = vec![0.0; bins];
                row[*first..first + w.len()].copy_from_slice(w);
                row
            })
            .collect()
    }

    /// The log-mel features of one window, `feature_size × nb_max_frames` row-major. `samples`
    /// (at `sampling_rate`) holds at most `n_samples` values; the rest of the window is
    /// `padding_value`. Longer input is cut to the window.
    pub fn compute(&self, samples: &[f32]) -> Vec<f32> {
        let c = &self.cfg;
        let (n, half) = (c.n_samples, c.n_fft / 2);
        let mut padded = vec![c.padding_value; n];
        for (d, &s) in padded.iter_mut().zip(samples) {
            *d = f64::from(s);
        }
        // torch.stft(center=True, pad_mode="reflect"): index -i reads i, n-1+i reads n-1-i.
        let ext: Vec<f64> = (0..n + 2 * half)
            .map(|i| {
                let j = i as isize - half as isize;
                let j = if j < 0 {
                    (-j) as usize
                } else if j as usize >= n {
                    2 * (n - 1) - j as usize
                } else {
                    j as usize
                };
                padded[j]
            })
            .collect();
        let frames = c.nb_max_frames;
        let n_mels = c.feature_size;
        let columns: Vec<Vec<f64>> = (0..frames)
            .into_par_iter()
            .map(|t| {
                let seg = &ext[t * c.hop_length..t * c.hop_length + c.n_fft];
                if seg.iter().all(|&x| x == 0.0) {
                    return vec![0.0; n_mels];
                }
                let x: Vec<f64> = seg.iter().zip(&self.window).map(|(a, w)| a * w).collect();
                let spec = self.fft.forward(&x);
                let power: Vec<f64> = spec[..=half]
                    .iter()
                    .map(|(re, im)| re * re + im * im)
                    .collect();
                self.filters
                    .iter()
                    .map(|(first, w)| w.iter().zip(&power[*first..]).map(|(a, b)| a * b).sum())
                    .collect()
            })
            .collect();
        let mut log = vec![0.0f64; n_mels * frames];
        for (t, col) in columns.iter().enumerate() {
            for (m, &v) in col.iter().enumerate() {
                log[m * frames + t] = v.max(1e-10).log10();
            }
        }
        let floor = log.iter().copied().fold(f64::NEG_INFINITY, f64::max) - 8.0;
        log.iter()
            .map(|&v| ((v.max(floor) + 4.0) / 4.0) as f32)
            .collect()
    }
}

/// Resamples a mono clip from `from` Hz to `to` Hz with rubato's FFT resampler (a windowed-sinc
/// low-pass, BlackmanHarris², cutoff just under the lower Nyquist frequency, applied by overlap-
/// add in f64). The output has `ceil(len · to / from)` samples, with output sample `m` at time
/// `m / to` (the resampler's delay removed), and zeros assumed outside the clip.
pub fn resample(samples: &[f32], from: u32, to: u32) -> Result<Vec<f32>, String> {
    if from == to {
        return Ok(samples.to_vec());
    }
    if from == 0 || to == 0 {
        return Err(format!("cannot resample from {from} Hz to {to} Hz"));
    }
    let (from_u, to_u) = (from as usize, to as usize);
    let g = gcd(from_u, to_u);
    let block = from_u / g;
    // An even number of blocks keeps both FFT sizes even, so the filter's delay of
    // fft_size_in / 2 input samples is exactly output_delay() output samples.
    let blocks = RESAMPLE_CHUNK.div_ceil(block).max(2).next_multiple_of(2);
    let mut r = FftFixedInOut::<f64>::new(from_u, to_u, blocks * block, 1)
        .map_err(|e| format!("resampler {from} Hz -> {to} Hz: {e}"))?;
    let out_len = usize::try_from((samples.len() as u128 * to as u128).div_ceil(from as u128))
        .map_err(|_| "clip too long to resample".to_string())?;
    let delay = r.output_delay();
    let needed = delay + out_len;
    let (chunk_in, chunk_out) = (r.input_frames_next(), r.output_frames_next());
    let mut input = vec![vec![0.0f64; chunk_in]];
    let mut output = vec![vec![0.0f64; chunk_out]];
    let mut out = Vec::with_capacity(needed + chunk_out);
    let mut pos = 0;
    while out.len() < needed {
        let take = chunk_in.min(samples.len().saturating_sub(pos));
        for (d, &s) in input[0].iter_mut().zip(&samples[pos..pos + take]) {
            *d = f64::from(s);
        }
        input[0][take..].fill(0.0);
        pos += take;
        r.process_into_buffer(&input, &mut output, None)
            .map_err(|e| format!("resampler {from} Hz -> {to} Hz: {e}"))?;
        out.extend_from_slice(&output[0]);
    }
    Ok(out[delay..needed].iter().map(|&v| v as f32).collect())
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_dft(x: &[f64]) -> Vec<(f64, f64)> {
        let n = x.len();
        (0..n)
            .map(|k| {
                x.iter().enumerate().fold((0.0, 0.0), |(re, im), (j, &v)| {
                    let a = -std::f64::consts::TAU * (k * j % n) as f64 / n as f64;
                    (re + v * a.cos(), im + v * a.sin())
                })
            })
            .collect()
    }

    #[test]
    fn fft_matches_dft_for_mixed_sizes() {
        for n in [1, 2, 7, 12, 25, 400, 512, 97 * 3] {
            let x: Vec<f64> = (0..n).map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0).collect();
            let (a, b) = (Fft::new(n).forward(&x), naive_dft(&x));
            for (p, q) in a.iter().zip(&b) {
                assert!(
                    (p.0 - q.0).abs() < 1e-9 && (p.1 - q.1).abs() < 1e-9,
                    "n {n}"
                );
            }
        }
    }

    #[test]
    fn slaney_filters_are_triangles_normalised_by_width() {
        let bank = mel_filter_bank(201, 80, 0.0, 8000.0, 16000);
        assert_eq!(bank.len(), 80);
        for row in &bank {
            assert_eq!(row.len(), 201);
            assert!(row.iter().all(|&w| w >= 0.0));
            // One triangle: non-zero on a single run of bins.
            let first = row.iter().position(|&w| w > 0.0).unwrap();
            let last = row.iter().rposition(|&w| w > 0.0).unwrap();
            assert!(row[first..=last].iter().all(|&w| w > 0.0));
        }
        // Slaney norm: each triangle's area over frequency is ~1 (exact for the continuous
        // triangle; 40 Hz bins sample it).
        let last = &bank[79];
        let area: f64 = last.iter().sum::<f64>() * 40.0;
        assert!((area - 1.0).abs() < 0.05, "{area}");
        // Mel scale round trip, both branches.
        for hz in [0.0, 300.0, 999.0, 1000.0, 4000.0, 8000.0] {
            assert!((mel_to_hz_slaney(hz_to_mel_slaney(hz)) - hz).abs() < 1e-9);
        }
    }

    #[test]
    fn resampling_keeps_a_low_tone_and_its_timing() {
        let (from, to) = (22050u32, 16000u32);
        let f = 440.0;
        let x: Vec<f32> = (0..22050)
            .map(|i| (std::f64::consts::TAU * f * i as f64 / from as f64).sin() as f32)
            .collect();
        let y = resample(&x, from, to).unwrap();
        assert_eq!(y.len(), 16000);
        // Away from the clip's edges the tone is reproduced at the right phase.
        let worst = (2000..14000)
            .map(|m| {
                let want = (std::f64::consts::TAU * f * m as f64 / to as f64).sin();
                (f64::from(y[m]) - want).abs()
            })
            .fold(0.0, f64::max);
        assert!(worst < 1e-3, "{worst}");
        assert_eq!(resample(&x, 16000, 16000).unwrap(), x);
        assert!(resample(&x, 0, 16000).is_err());
    }
}
