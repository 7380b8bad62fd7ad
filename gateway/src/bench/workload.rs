//! What `omnistage bench` sends: the workload (request mix, arrival process, length
//! distributions, image shape), read from a TOML file and/or flags, and the seeded request list
//! it expands to.
//!
//! The file is walked by hand (not `serde` derive) so every error names the file and the dotted
//! field (`load.toml: field `arrival.rate`: must be > 0, got -1`); an unknown key is an error
//! too, because a misspelt field that is silently ignored makes a benchmark measure the wrong
//! thing.

use super::rng::SplitMix64;
use serde::{Deserialize, Serialize};

/// The kinds of request a workload mixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Streamed chat completion (text out): TTFT measured.
    Text,
    /// `POST /v1/images/generations`.
    Image,
    /// Streamed chat with `modalities: ["text", "image"]`.
    Omni,
    /// Streamed chat with `modalities: ["text", "audio"]` (thinker → talker → codec): TTFP and
    /// RTF measured.
    Speech,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Text, Kind::Image, Kind::Omni, Kind::Speech];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Image => "image",
            Kind::Omni => "omni",
            Kind::Speech => "speech",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// A distribution of a positive integer (prompt words, output tokens).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "dist", rename_all = "lowercase")]
pub enum Dist {
    Fixed {
        value: u64,
    },
    /// Inclusive bounds.
    Uniform {
        min: u64,
        max: u64,
    },
    /// `median·exp(sigma·z)`, clamped to `[min, max]`: many short requests and a long tail, as
    /// real traffic has. Files may give `mean` instead of `median` (`median = mean·e^(−σ²/2)`).
    Lognormal {
        median: f64,
        sigma: f64,
        min: u64,
        max: u64,
    },
}

impl Dist {
    pub fn sample(&self, rng: &mut SplitMix64) -> u64 {
        match *self {
            Dist::Fixed { value } => value,
            Dist::Uniform { min, max } => min + rng.below(max - min + 1),
            Dist::Lognormal {
                median,
                sigma,
                min,
                max,
            } => {
                let v = (median * (sigma * rng.normal()).exp()).round();
                // `as` saturates: NaN → 0, huge → u64::MAX, both then clamped.
                (v as u64).clamp(min, max)
            }
        }
    }

    /// Parses the flag form: `N`, `uniform:MIN:MAX`, `lognormal:MEAN:SIGMA[:MIN:MAX]`.
    pub fn parse_flag(s: &str) -> Result<Dist, String> {
        let parts: Vec<&str> = s.split(':').map(str::trim).collect();
        let num = |i: usize| -> Result<f64, String> {
            parts
                .get(i)
                .and_then(|p| p.parse::<f64>().ok())
                .filter(|v| v.is_finite())
                .ok_or_else(|| {
                    format!("`{s}`: expected N, uniform:MIN:MAX or lognormal:MEAN:SIGMA[:MIN:MAX]")
                })
        };
        let d = match (parts[0], parts.len()) {
            (_, 1) => Dist::Fixed {
                value: to_count(num(0)?)
                    .ok_or_else(|| format!("`{s}`: must be a whole number ≥ 1"))?,
            },
            ("uniform", 3) => Dist::Uniform {
                min: to_count(num(1)?)
                    .ok_or_else(|| format!("`{s}`: MIN must be a whole number ≥ 1"))?,
                max: to_count(num(2)?)
                    .ok_or_else(|| format!("`{s}`: MAX must be a whole number ≥ 1"))?,
            },
            ("lognormal", 3 | 5) => {
                let (min, max) = if parts.len() == 5 {
                    (
                        to_count(num(3)?).ok_or_else(|| format!("`{s}`: MIN must be ≥ 1"))?,
                        to_count(num(4)?).ok_or_else(|| format!("`{s}`: MAX must be ≥ 1"))?,
                    )
                } else {
                    (1, LOGNORMAL_DEFAULT_MAX)
                };
                let (mean, sigma) = (num(1)?, num(2)?);
                Dist::Lognormal {
                    median: mean * (-sigma * sigma / 2.0).exp(),
                    sigma,
                    min,
                    max,
                }
            }
            _ => {
                return Err(format!(
                    "`{s}`: expected N, uniform:MIN:MAX or lognormal:MEAN:SIGMA[:MIN:MAX]"
                ))
            }
        };
        d.check().map_err(|e| format!("`{s}`: {e}"))?;
        Ok(d)
    }

    fn check(&self) -> Result<(), String> {
        match *self {
            Dist::Fixed { value: 0 } => Err("value must be ≥ 1".into()),
            Dist::Uniform { min, max } | Dist::Lognormal { min, max, .. }
                if min == 0 || min > max =>
            {
                Err(format!("needs 1 ≤ min ≤ max, got min {min}, max {max}"))
            }
            Dist::Lognormal { median, sigma, .. } if !(median > 0.0 && sigma >= 0.0) => Err(
                format!("needs mean/median > 0 and sigma ≥ 0, got median {median}, sigma {sigma}"),
            ),
            _ => Ok(()),
        }
    }
}

/// Upper clamp of a log-normal given without one.
const LOGNORMAL_DEFAULT_MAX: u64 = 4096;

fn to_count(v: f64) -> Option<u64> {
    (v >= 1.0 && v.fract() == 0.0 && v <= u32::MAX as f64).then_some(v as u64)
}

/// When requests are sent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "process", rename_all = "lowercase")]
pub enum Arrival {
    /// Open loop: exponential gaps at `rate` requests per second, whatever the server does.
    Poisson { rate: f64 },
    /// Closed loop: `concurrency` requests always in flight, the next sent when one finishes.
    Closed { concurrency: u64 },
}

/// Image requests' shape (`image` and `omni` kinds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageShape {
    /// `WIDTHxHEIGHT`, as the API takes it.
    pub size: String,
    pub steps: u64,
    pub n: u64,
}

/// Offered loads to sweep: Poisson rates, or closed-loop concurrencies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sweep {
    Rates(Vec<f64>),
    Concurrency(Vec<u64>),
}

impl Sweep {
    /// Parses `rates=0.5,1,2` or `concurrency=1,2,4`.
    pub fn parse_flag(s: &str) -> Result<Sweep, String> {
        let bad = || format!("--sweep `{s}`: expected rates=R1,R2,... or concurrency=C1,C2,...");
        let (key, list) = s.split_once('=').ok_or_else(bad)?;
        let values: Vec<&str> = list.split(',').map(str::trim).collect();
        let sweep = match key.trim() {
            "rates" | "rate" => Sweep::Rates(
                values
                    .iter()
                    .map(|v| v.parse::<f64>().map_err(|_| bad()))
                    .collect::<Result<_, _>>()?,
            ),
            "concurrency" => Sweep::Concurrency(
                values
                    .iter()
                    .map(|v| v.parse::<u64>().map_err(|_| bad()))
                    .collect::<Result<_, _>>()?,
            ),
            _ => return Err(bad()),
        };
        sweep.check().map_err(|e| format!("--sweep `{s}`: {e}"))?;
        Ok(sweep)
    }

    pub(super) fn check(&self) -> Result<(), String> {
        let ok = match self {
            Sweep::Rates(r) => !r.is_empty() && r.iter().all(|r| r.is_finite() && *r > 0.0),
            Sweep::Concurrency(c) => !c.is_empty() && c.iter().all(|c| *c >= 1),
        };
        if ok {
            Ok(())
        } else {
            Err("needs at least one value, each > 0".into())
        }
    }

    /// The workload at each offered load.
    pub fn points(&self, base: &Workload) -> Vec<(f64, Workload)> {
        let with = |arrival| Workload {
            arrival,
            sweep: None,
            ..base.clone()
        };
        match self {
            Sweep::Rates(r) => r
                .iter()
                .map(|&rate| (rate, with(Arrival::Poisson { rate })))
                .collect(),
            Sweep::Concurrency(c) => c
                .iter()
                .map(|&concurrency| (concurrency as f64, with(Arrival::Closed { concurrency })))
                .collect(),
        }
    }

    pub fn axis(&self) -> &'static str {
        match self {
            Sweep::Rates(_) => "rate",
            Sweep::Concurrency(_) => "concurrency",
        }
    }
}

/// A whole workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    pub seed: u64,
    /// Requests to send; with `duration_s` too, whichever ends first.
    pub count: Option<u64>,
    /// Stop sending after this many seconds; requests in flight still finish. A Poisson request
    /// still waiting for an in-flight slot then is not sent (nor counted).
    pub duration_s: Option<f64>,
    pub arrival: Arrival,
    /// Relative weight of each kind (`[text, image, omni, speech]`).
    pub mix: [f64; 4],
    pub prompt_words: Dist,
    pub max_tokens: Dist,
    /// Ask the LLM to ignore EOS, so each text request makes exactly its `max_tokens`.
    pub ignore_eos: bool,
    pub image: ImageShape,
    /// Requests in flight at most: an open loop that overloads the server waits for a slot
    /// instead of piling up tasks and sockets without bound.
    pub max_in_flight: u64,
    pub sweep: Option<Sweep>,
    pub label: Option<String>,
    /// Fields merged into every chat request's body (e.g. `{"router_k": 2}`).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra_body: serde_json::Map<String, serde_json::Value>,
}

/// Requests sent when neither `count` nor `duration_s` is given.
pub const DEFAULT_COUNT: u64 = 32;

impl Default for Workload {
    fn default() -> Self {
        Workload {
            seed: 0,
            count: None,
            duration_s: None,
            arrival: Arrival::Poisson { rate: 1.0 },
            mix: [1.0, 0.0, 0.0, 0.0],
            prompt_words: Dist::Lognormal {
                median: 24.0,
                sigma: 0.6,
                min: 1,
                max: 512,
            },
            max_tokens: Dist::Lognormal {
                median: 32.0,
                sigma: 0.5,
                min: 1,
                max: 256,
            },
            ignore_eos: true,
            image: ImageShape {
                size: "64x64".into(),
                steps: 8,
                n: 1,
            },
            max_in_flight: 256,
            sweep: None,
            label: None,
            extra_body: serde_json::Map::new(),
        }
    }
}

/// One request of the list.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub index: u64,
    pub kind: Kind,
    /// Poisson: when to send it, in seconds after the run starts. Closed loop: `None`.
    pub at_s: Option<f64>,
    pub prompt: String,
    pub prompt_words: u64,
    pub max_tokens: u64,
    /// Seed sent with the request (sampling, image noise), so a rerun asks for the same work.
    pub seed: u64,
}

/// Words prompts are drawn from: plain English, so any tokenizer splits them evenly.
const WORDS: [&str; 32] = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "in", "bright", "morning",
    "light", "while", "river", "flows", "past", "old", "stone", "bridge", "near", "quiet", "town",
    "with", "red", "roofs", "and", "tall", "green", "trees", "under", "sky",
];

impl Workload {
    /// The request list, lazily: the same seed gives the same list. Each request's content comes
    /// from its own stream (seed, index), and arrival gaps from another, so a sweep over rates
    /// sends exactly the same requests at every load, only spaced differently.
    pub fn requests(&self) -> impl Iterator<Item = Planned> + Send + 'static {
        let wl = self.clone();
        let count = match (wl.count, wl.duration_s) {
            (Some(c), _) => Some(c),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_COUNT),
        };
        let duration = wl.duration_s;
        let mut arrivals = SplitMix64::new(wl.seed ^ 0xa5a5_5a5a_0f0f_f0f0);
        let mut t = 0.0f64;
        (0u64..)
            .take_while(move |i| count.is_none_or(|c| *i < c))
            .map(move |index| {
                let at_s = match wl.arrival {
                    Arrival::Poisson { rate } => {
                        if index > 0 {
                            t += arrivals.exponential() / rate;
                        }
                        Some(t)
                    }
                    Arrival::Closed { .. } => None,
                };
                wl.plan(index, at_s)
            })
            .take_while(move |p| match (p.at_s, duration) {
                (Some(at), Some(d)) => at < d,
                _ => true,
            })
    }

    fn plan(&self, index: u64, at_s: Option<f64>) -> Planned {
        let mut rng = SplitMix64::new(self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ index);
        let total: f64 = self.mix.iter().sum();
        let mut pick = rng.unit() * total;
        let mut kind = Kind::Text;
        for (k, w) in Kind::ALL.into_iter().zip(self.mix) {
            if w > 0.0 {
                kind = k;
                if pick < w {
                    break;
                }
                pick -= w;
            }
        }
        let prompt_words = self.prompt_words.sample(&mut rng);
        let max_tokens = self.max_tokens.sample(&mut rng);
        let prompt = (0..prompt_words)
            .map(|_| WORDS[rng.below(WORDS.len() as u64) as usize])
            .collect::<Vec<_>>()
            .join(" ");
        Planned {
            index,
            kind,
            at_s,
            prompt,
            prompt_words,
            max_tokens,
            seed: rng.next_u64() >> 33,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mixed() -> Workload {
        Workload {
            seed: 11,
            count: Some(200),
            mix: [2.0, 1.0, 1.0, 0.0],
            arrival: Arrival::Poisson { rate: 4.0 },
            ..Workload::default()
        }
    }

    #[test]
    fn a_seed_names_one_request_list() {
        let a: Vec<Planned> = mixed().requests().collect();
        let b: Vec<Planned> = mixed().requests().collect();
        assert_eq!(a.len(), 200);
        assert_eq!(a, b);
        let other: Vec<Planned> = Workload {
            seed: 12,
            ..mixed()
        }
        .requests()
        .collect();
        assert_ne!(a, other);
        // The mix is honoured roughly, and speech (weight 0) never drawn.
        let n = |k: Kind| a.iter().filter(|p| p.kind == k).count();
        assert_eq!(n(Kind::Speech), 0);
        assert!(n(Kind::Text) > n(Kind::Image) && n(Kind::Image) > 20 && n(Kind::Omni) > 20);
        // Arrivals rise, and lengths stay inside their clamps.
        assert!(a.windows(2).all(|w| w[0].at_s < w[1].at_s));
        assert!(a.iter().all(|p| (1..=512).contains(&p.prompt_words)));
        assert!(a
            .iter()
            .all(|p| p.prompt.split(' ').count() as u64 == p.prompt_words));
    }

    #[test]
    fn a_sweep_sends_the_same_requests_at_every_load() {
        let wl = Workload {
            sweep: Some(Sweep::Rates(vec![1.0, 4.0])),
            ..mixed()
        };
        let sw = wl.sweep.clone().unwrap();
        let points = sw.points(&wl);
        let slow: Vec<Planned> = points[0].1.requests().collect();
        let fast: Vec<Planned> = points[1].1.requests().collect();
        for (s, f) in slow.iter().zip(&fast) {
            assert_eq!(
                (&s.prompt, s.kind, s.max_tokens),
                (&f.prompt, f.kind, f.max_tokens)
            );
            let (ts, tf) = (s.at_s.unwrap(), f.at_s.unwrap());
            assert!((ts - 4.0 * tf).abs() < 1e-9, "same gaps, scaled");
        }
    }

    #[test]
    fn duration_bounds_poisson_lists_and_closed_lists_are_endless() {
        let wl = Workload {
            count: None,
            duration_s: Some(10.0),
            ..mixed()
        };
        let list: Vec<Planned> = wl.requests().collect();
        assert!(list.iter().all(|p| p.at_s.unwrap() < 10.0));
        assert!(list.len() > 10 && list.len() < 100, "{}", list.len());
        let closed = Workload {
            arrival: Arrival::Closed { concurrency: 2 },
            ..wl
        };
        assert_eq!(closed.requests().take(1000).count(), 1000);
        assert_eq!(Workload::default().requests().count() as u64, DEFAULT_COUNT);
    }

    #[test]
    fn distributions_and_flags() {
        let mut rng = SplitMix64::new(1);
        let d = Dist::parse_flag("uniform:3:5").unwrap();
        assert!((0..100).all(|_| (3..=5).contains(&d.sample(&mut rng))));
        assert_eq!(Dist::parse_flag("7").unwrap(), Dist::Fixed { value: 7 });
        let ln = Dist::parse_flag("lognormal:100:0.5:10:1000").unwrap();
        let mean = (0..4000).map(|_| ln.sample(&mut rng) as f64).sum::<f64>() / 4000.0;
        assert!(
            (90.0..110.0).contains(&mean),
            "a `mean` is the mean: {mean}"
        );
        for bad in [
            "0",
            "uniform:5:3",
            "lognormal:-1:1",
            "zipf:1",
            "uniform:1",
            "x",
        ] {
            assert!(Dist::parse_flag(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Sweep::parse_flag("rates=0.5, 1,2").unwrap(),
            Sweep::Rates(vec![0.5, 1.0, 2.0])
        );
        assert_eq!(
            Sweep::parse_flag("concurrency=1,4").unwrap(),
            Sweep::Concurrency(vec![1, 4])
        );
        for bad in ["rates=", "rates=0", "speed=1", "concurrency=0.5"] {
            assert!(Sweep::parse_flag(bad).is_err(), "{bad}");
        }
    }
}
