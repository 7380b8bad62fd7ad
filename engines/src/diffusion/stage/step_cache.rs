//! Step caching (TeaCache-style): between denoising steps the block stack's effect on the image
//! stream changes slowly, so when the first block's timestep-modulated input moved little since
//! the last computed step, the stack's residual from that step is reused instead of recomputed.
//!
//! The decision is per job (all rows of one request decide together: its images and both
//! guidance branches), so a request caches the same way alone or batched with others. The change
//! indicator is the raw relative L1 distance, accumulated over skipped steps; TeaCache's
//! per-model polynomial rescaling is not applied (it needs coefficients fitted per checkpoint).

use crate::diffusion::DiffusionError;
use candle_core::Tensor;

/// One job's cache state.
#[derive(Debug, Default)]
pub struct StepCache {
    previous_modulated: Option<Tensor>,
    accumulated: f64,
    residual: Option<Tensor>,
    /// Steps that reused the residual.
    pub reused_steps: usize,
}

impl StepCache {
    /// Decides whether step `step` (of `steps`) must run the block stack, given this step's
    /// modulated input for the job's rows. The first and last steps always compute.
    pub fn must_compute(
        &mut self,
        modulated: &Tensor,
        step: usize,
        steps: usize,
        threshold: f64,
    ) -> Result<bool, DiffusionError> {
        let compute = match (&self.previous_modulated, &self.residual) {
            (Some(prev), Some(_)) if step > 0 && step + 1 < steps => {
                let change = (modulated - prev)?.abs()?.mean_all()?.to_scalar::<f32>()?;
                let scale = prev.abs()?.mean_all()?.to_scalar::<f32>()?;
                self.accumulated += f64::from(change) / f64::from(scale).max(1e-12);
                self.accumulated >= threshold
            }
            _ => true,
        };
        if compute {
            self.accumulated = 0.0;
        } else {
            self.reused_steps += 1;
        }
        self.previous_modulated = Some(modulated.clone());
        Ok(compute)
    }

    /// Records the residual (`stack output − stack input`) of a computed step.
    pub fn store(&mut self, residual: Tensor) {
        self.residual = Some(residual);
    }

    /// The stack output for a skipped step: `input + last residual`.
    pub fn reuse(&self, stack_input: &Tensor) -> Result<Tensor, DiffusionError> {
        let residual = self
            .residual
            .as_ref()
            .ok_or_else(|| DiffusionError::Input("step cache has no residual yet".into()))?;
        Ok((stack_input + residual)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_and_last_steps_compute_and_small_changes_reuse() {
        let d = Device::Cpu;
        let a = Tensor::new(&[[1.0f32, 2.0]], &d).unwrap();
        let b = Tensor::new(&[[1.01f32, 2.0]], &d).unwrap();
        let far = Tensor::new(&[[5.0f32, -2.0]], &d).unwrap();
        let mut c = StepCache::default();
        assert!(c.must_compute(&a, 0, 5, 0.1).unwrap());
        c.store(Tensor::new(&[[0.5f32, 0.5]], &d).unwrap());
        assert!(
            !c.must_compute(&b, 1, 5, 0.1).unwrap(),
            "small change reuses"
        );
        let reused = c.reuse(&b).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(reused, vec![vec![1.51, 2.5]]);
        assert!(
            c.must_compute(&far, 2, 5, 0.1).unwrap(),
            "large change computes"
        );
        assert!(
            c.must_compute(&far, 4, 5, 0.1).unwrap(),
            "last step computes"
        );
        assert_eq!(c.reused_steps, 1);
    }
}
