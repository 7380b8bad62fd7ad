//! The knobs that bound one stage's queue and batches.

use std::time::Duration;

/// Limits for one stage's queue and for each step it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most jobs running (admitted to the engine) at once.
    pub max_batch_size: usize,
    /// Per-step token budget: one token per decoding job plus prefill chunks. Must be at least
    /// `max_batch_size` so every running decode fits in one step.
    pub max_batched_tokens: usize,
    /// With nothing running, how long to let a partial batch fill up before starting it
    /// (`Duration::ZERO` starts at once).
    pub max_wait: Duration,
    /// Most jobs waiting for admission; a submit beyond it is refused.
    pub max_queue: usize,
}

/// Why a [`BatchLimits`] is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    /// No job could ever run.
    #[error("max_batch_size must be at least 1")]
    ZeroBatchSize,
    /// A full batch of decoding jobs would not fit in one step.
    #[error("max_batched_tokens ({max_batched_tokens}) must be at least max_batch_size ({max_batch_size})")]
    BudgetBelowBatchSize {
        max_batched_tokens: usize,
        max_batch_size: usize,
    },
}

impl BatchLimits {
    /// Checks the limits are usable (for configuration loading; reject, don't guess).
    /// `max_queue == 0` is valid: the stage then refuses every submit.
    pub fn validate(&self) -> Result<(), LimitsError> {
        if self.max_batch_size == 0 {
            return Err(LimitsError::ZeroBatchSize);
        }
        if self.max_batched_tokens < self.max_batch_size {
            return Err(LimitsError::BudgetBelowBatchSize {
                max_batched_tokens: self.max_batched_tokens,
                max_batch_size: self.max_batch_size,
            });
        }
        Ok(())
    }

    /// The nearest usable limits: `max_batch_size` at least 1 and `max_batched_tokens` at least
    /// `max_batch_size`. What the policy runs with when handed limits that fail [`validate`].
    ///
    /// [`validate`]: BatchLimits::validate
    pub fn normalized(self) -> BatchLimits {
        let max_batch_size = self.max_batch_size.max(1);
        BatchLimits {
            max_batch_size,
            max_batched_tokens: self.max_batched_tokens.max(max_batch_size),
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(batch: usize, tokens: usize) -> BatchLimits {
        BatchLimits {
            max_batch_size: batch,
            max_batched_tokens: tokens,
            max_wait: Duration::ZERO,
            max_queue: 8,
        }
    }

    #[test]
    fn validate_rejects_unusable_limits() {
        assert_eq!(limits(0, 8).validate(), Err(LimitsError::ZeroBatchSize));
        assert!(matches!(
            limits(8, 4).validate(),
            Err(LimitsError::BudgetBelowBatchSize { .. })
        ));
        assert_eq!(limits(4, 4).validate(), Ok(()));
    }

    #[test]
    fn normalized_is_valid() {
        assert_eq!(limits(0, 0).normalized().validate(), Ok(()));
        assert_eq!(limits(8, 4).normalized(), limits(8, 8));
        assert_eq!(limits(2, 16).normalized(), limits(2, 16));
    }
}
