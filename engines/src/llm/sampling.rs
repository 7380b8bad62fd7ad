//! Per-request token sampling: greedy, temperature, top-k, top-p, repetition penalty, seeded.

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use omnistage_stages::SamplingParams;

/// Sampling settings after defaults are resolved; what one sequence samples with.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedSampling {
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl ResolvedSampling {
    /// Resolves `params` (already merged with stage and checkpoint defaults); an unset seed draws
    /// a fresh one so unseeded requests differ.
    pub fn from_params(params: &SamplingParams) -> Self {
        Self {
            temperature: params.temperature.unwrap_or(1.0).max(0.0),
            top_p: params.top_p.filter(|p| *p > 0.0 && *p < 1.0),
            top_k: params.top_k.filter(|k| *k > 0),
            repetition_penalty: params.repetition_penalty.unwrap_or(1.0),
            seed: params.seed.unwrap_or_else(rand::random),
        }
    }

    fn to_candle(&self) -> Sampling {
        if self.temperature < 1e-7 {
            return Sampling::ArgMax;
        }
        let temperature = self.temperature;
        match (self.top_k, self.top_p) {
            (None, None) => Sampling::All { temperature },
            (Some(k), None) => Sampling::TopK { k, temperature },
            (None, Some(p)) => Sampling::TopP { p, temperature },
            (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
        }
    }
}

/// One sequence's sampler; owns its RNG so a seeded request is reproducible whatever else runs
/// in the batch.
pub struct Sampler {
    settings: ResolvedSampling,
    processor: LogitsProcessor,
}

impl Sampler {
    pub fn new(settings: ResolvedSampling) -> Self {
        let processor = LogitsProcessor::from_sampling(settings.seed, settings.to_candle());
        Self {
            settings,
            processor,
        }
    }

    pub fn settings(&self) -> &ResolvedSampling {
        &self.settings
    }

    /// Picks the next token from one row of f32 logits (`[vocab]`), penalising tokens in `context`.
    pub fn sample(&mut self, logits: &Tensor, context: &[u32]) -> candle_core::Result<u32> {
        let penalty = self.settings.repetition_penalty;
        if (penalty - 1.0).abs() > f32::EPSILON && penalty > 0.0 {
            let penalised =
                candle_transformers::utils::apply_repeat_penalty(logits, penalty, context)?;
            self.processor.sample(&penalised)
        } else {
            self.processor.sample(logits)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn logits(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn settings(temperature: f64, seed: u64) -> ResolvedSampling {
        ResolvedSampling {
            temperature,
            top_p: None,
            top_k: None,
            repetition_penalty: 1.0,
            seed,
        }
    }

    #[test]
    fn zero_temperature_is_greedy() {
        let mut s = Sampler::new(settings(0.0, 1));
        assert_eq!(s.sample(&logits(&[0.1, 3.0, 0.2]), &[]).unwrap(), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let l = logits(&[1.0, 1.1, 0.9, 1.05]);
        let draw = |seed| {
            let mut s = Sampler::new(settings(1.0, seed));
            (0..32)
                .map(|_| s.sample(&l, &[]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = Sampler::new(ResolvedSampling {
            top_k: Some(1),
            ..settings(5.0, 3)
        });
        for _ in 0..16 {
            assert_eq!(s.sample(&logits(&[0.5, 0.4, 2.0]), &[]).unwrap(), 2);
        }
    }

    #[test]
    fn repetition_penalty_moves_greedy_choice() {
        let mut s = Sampler::new(ResolvedSampling {
            repetition_penalty: 2.0,
            ..settings(0.0, 3)
        });
        assert_eq!(s.sample(&logits(&[1.0, 0.8]), &[0]).unwrap(), 1);
    }

    #[test]
    fn unset_fields_resolve_to_full_distribution() {
        let r = ResolvedSampling::from_params(&SamplingParams {
            seed: Some(4),
            ..Default::default()
        });
        assert_eq!(r.temperature, 1.0);
        assert_eq!(r.top_p, None);
        assert_eq!(r.seed, 4);
    }
}
