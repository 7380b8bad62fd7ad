//! The flow-matching Euler scheduler (diffusers' `FlowMatchEulerDiscreteScheduler`), as SD3 and
//! FLUX pipelines drive it: the sigma schedule for a number of steps, and the Euler update
//! `x ← x + (σ_next − σ) · v`.
//!
//! The arithmetic mirrors diffusers 0.42 so a schedule computed here equals the pipeline's: the
//! training sigmas are built in f32, the inference schedule in f64 and rounded to f32 at the end.

use super::{read_json, DiffusionError};
use serde::Deserialize;
use std::path::Path;

/// `scheduler/scheduler_config.json`, the fields that shape the schedule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FlowMatchConfig {
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_shift")]
    pub shift: f64,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default = "default_base_shift")]
    pub base_shift: f64,
    #[serde(default = "default_max_shift")]
    pub max_shift: f64,
    #[serde(default = "default_base_seq_len")]
    pub base_image_seq_len: usize,
    #[serde(default = "default_max_seq_len")]
    pub max_image_seq_len: usize,
    #[serde(default)]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default = "default_time_shift_type")]
    pub time_shift_type: String,
    #[serde(default)]
    pub stochastic_sampling: bool,
}

fn default_train_steps() -> usize {
    1000
}
fn default_shift() -> f64 {
    1.0
}
fn default_base_shift() -> f64 {
    0.5
}
fn default_max_shift() -> f64 {
    1.15
}
fn default_base_seq_len() -> usize {
    256
}
fn default_max_seq_len() -> usize {
    4096
}
fn default_time_shift_type() -> String {
    "exponential".into()
}

impl Default for FlowMatchConfig {
    fn default() -> Self {
        // serde fills every field from its default.
        serde_json::from_str("{}").unwrap_or_else(|_| unreachable!("all fields have defaults"))
    }
}

/// How a pipeline asks for its schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScheduleStyle {
    /// SD3's pipeline: the scheduler's own timesteps between its training sigma extremes.
    TrainingRange,
    /// FLUX's pipeline: `sigmas = linspace(1, 1/steps, steps)`, shifted by the image's token
    /// count when the config asks for dynamic shifting.
    Linear,
}

/// The scheduler of one pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowMatchScheduler {
    config: FlowMatchConfig,
    sigma_max: f64,
    sigma_min: f64,
}

impl FlowMatchScheduler {
    /// Reads `scheduler_config.json`; refuses the options this scheduler does not implement.
    pub fn load(path: &Path) -> Result<Self, DiffusionError> {
        let config: FlowMatchConfig = read_json(path)?;
        Self::new(config).map_err(|m| DiffusionError::config(path, m))
    }

    /// Checks `config` and precomputes the training sigma range.
    pub fn new(config: FlowMatchConfig) -> Result<Self, String> {
        let unsupported = [
            (config.invert_sigmas, "invert_sigmas"),
            (config.use_karras_sigmas, "use_karras_sigmas"),
            (config.use_exponential_sigmas, "use_exponential_sigmas"),
            (config.use_beta_sigmas, "use_beta_sigmas"),
            (config.stochastic_sampling, "stochastic_sampling"),
        ];
        if let Some((_, name)) = unsupported.iter().find(|(on, _)| *on) {
            return Err(format!("`{name}: true` is not supported by this scheduler"));
        }
        if config.num_train_timesteps == 0 {
            return Err("`num_train_timesteps` must be at least 1".into());
        }
        if !(config.shift.is_finite() && config.shift > 0.0) {
            return Err(format!("`shift` must be > 0, got {}", config.shift));
        }
        if !matches!(config.time_shift_type.as_str(), "exponential" | "linear") {
            return Err(format!(
                "`time_shift_type` must be \"exponential\" or \"linear\", got {:?}",
                config.time_shift_type
            ));
        }
        if config.use_dynamic_shifting && config.max_image_seq_len == config.base_image_seq_len {
            return Err("`max_image_seq_len` must differ from `base_image_seq_len`".into());
        }
        if let Some(t) = config.shift_terminal {
            if !(0.0..1.0).contains(&t) {
                return Err(format!("`shift_terminal` must be in [0, 1), got {t}"));
            }
        }
        // Training sigmas, in f32 as diffusers builds them: linspace(1, N, N) reversed, / N,
        // shifted unless the shift is dynamic.
        let n = config.num_train_timesteps;
        let train = |i: usize| -> f64 {
            let t = (n - i) as f32 / n as f32;
            let s = if config.use_dynamic_shifting {
                t
            } else {
                let shift = config.shift as f32;
                shift * t / (1.0 + (shift - 1.0) * t)
            };
            f64::from(s)
        };
        let sigma_max = train(0);
        let sigma_min = train(n - 1);
        Ok(Self {
            config,
            sigma_max,
            sigma_min,
        })
    }

    pub fn config(&self) -> &FlowMatchConfig {
        &self.config
    }

    /// The `steps + 1` sigmas of a run (the last is 0): step `i` denoises from `sigmas[i]` to
    /// `sigmas[i + 1]`. `image_seq_len` (latent tokens after patching) matters only with dynamic
    /// shifting.
    pub fn sigmas(&self, steps: usize, style: ScheduleStyle, image_seq_len: usize) -> Vec<f32> {
        if steps == 0 {
            return vec![0.0];
        }
        let n = self.config.num_train_timesteps as f64;
        let linspace = |a: f64, b: f64| -> Vec<f64> {
            if steps == 1 {
                return vec![a];
            }
            (0..steps)
                .map(|i| a + (b - a) * i as f64 / (steps - 1) as f64)
                .collect()
        };
        let mut sigmas: Vec<f64> = match style {
            ScheduleStyle::TrainingRange => linspace(self.sigma_max * n, self.sigma_min * n)
                .into_iter()
                .map(|t| t / n)
                .collect(),
            ScheduleStyle::Linear => linspace(1.0, 1.0 / steps as f64),
        };
        if self.config.use_dynamic_shifting {
            let mu = self.mu(image_seq_len);
            for s in &mut sigmas {
                *s = self.time_shift(mu, *s);
            }
        } else {
            let shift = self.config.shift;
            for s in &mut sigmas {
                *s = shift * *s / (1.0 + (shift - 1.0) * *s);
            }
        }
        if let Some(terminal) = self.config.shift_terminal.filter(|t| *t > 0.0) {
            let last = 1.0 - sigmas[sigmas.len() - 1];
            let scale = last / (1.0 - terminal);
            for s in &mut sigmas {
                *s = 1.0 - (1.0 - *s) / scale;
            }
        }
        let mut out: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        out.push(0.0);
        out
    }

    /// The resolution-dependent shift FLUX's pipeline computes (`calculate_shift`).
    fn mu(&self, image_seq_len: usize) -> f64 {
        let c = &self.config;
        let m = (c.max_shift - c.base_shift)
            / (c.max_image_seq_len as f64 - c.base_image_seq_len as f64);
        let b = c.base_shift - m * c.base_image_seq_len as f64;
        image_seq_len as f64 * m + b
    }

    fn time_shift(&self, mu: f64, t: f64) -> f64 {
        if t <= 0.0 {
            return 0.0;
        }
        match self.config.time_shift_type.as_str() {
            "linear" => mu / (mu + (1.0 / t - 1.0)),
            _ => mu.exp() / (mu.exp() + (1.0 / t - 1.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(json: &str) -> FlowMatchScheduler {
        FlowMatchScheduler::new(serde_json::from_str(json).unwrap()).unwrap()
    }

    #[test]
    fn sd3_schedule_matches_diffusers() {
        // diffusers 0.42: FlowMatchEulerDiscreteScheduler(shift=3.0).set_timesteps(4).sigmas
        let s = sched(r#"{"shift": 3.0}"#);
        let got = s.sigmas(4, ScheduleStyle::TrainingRange, 0);
        let want = [1.0, 0.857_692_3, 0.602_150_6, 0.008_928_572, 0.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn flux_schedule_matches_diffusers() {
        // diffusers 0.42: use_dynamic_shifting=True, base_shift 0.5, max_shift 1.15;
        // set_timesteps(sigmas=linspace(1, 1/4, 4), mu=calculate_shift(1024)).sigmas
        let s = sched(r#"{"use_dynamic_shifting": true, "shift": 3.0}"#);
        let got = s.sigmas(4, ScheduleStyle::Linear, 1024);
        let want = [1.0, 0.849_234_8, 0.652_489_4, 0.384_944_7, 0.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn unsupported_options_are_named() {
        let err = FlowMatchScheduler::new(
            serde_json::from_str(r#"{"use_karras_sigmas": true}"#).unwrap(),
        )
        .unwrap_err();
        assert!(err.contains("use_karras_sigmas"), "{err}");
        let err =
            FlowMatchScheduler::new(serde_json::from_str(r#"{"shift": 0}"#).unwrap()).unwrap_err();
        assert!(err.contains("shift"), "{err}");
    }
}
