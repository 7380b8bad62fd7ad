//! The VAE stage engine: decodes latents to RGB images, batching every job of a step whose
//! latents have the same shape into one decode.

use crate::diffusion::vae::{to_rgb_images, Vae};
use candle_core::{Device, Tensor};
use omnistage_stages::{
    EngineError, EngineStats, FinishReason, JobId, Latents, Payload, RgbImages, StageEngine,
    StageEvent, StageInput, StepWork, Usage,
};
use std::collections::{BTreeMap, HashMap};

/// Static batching by latent shape.
pub struct VaeEngine {
    vae: Vae,
    device: Device,
    jobs: HashMap<JobId, Latents>,
    images_total: u64,
}

impl VaeEngine {
    pub fn new(vae: Vae, device: Device) -> Self {
        Self {
            vae,
            device,
            jobs: HashMap::new(),
            images_total: 0,
        }
    }

    pub fn vae(&self) -> &Vae {
        &self.vae
    }

    /// Decodes the jobs `ids` (same latent shape) in one batch.
    fn decode_group(&self, ids: &[JobId]) -> Result<Vec<(JobId, RgbImages)>, EngineError> {
        let compute = |e: &dyn std::fmt::Display| EngineError::Compute(e.to_string());
        let mut tensors = Vec::with_capacity(ids.len());
        for id in ids {
            let l = &self.jobs[id];
            let t = Tensor::from_slice(&l.data, (l.n, l.channels, l.height, l.width), &self.device)
                .map_err(|e| compute(&e))?;
            tensors.push(t);
        }
        let batch = Tensor::cat(&tensors, 0).map_err(|e| compute(&e))?;
        let images = self.vae.decode(&batch).map_err(|e| compute(&e))?;
        let images = to_rgb_images(&images).map_err(|e| compute(&e))?;
        let per_image = images.height * images.width * 3;
        let mut out = Vec::with_capacity(ids.len());
        let mut first = 0;
        for id in ids {
            let n = self.jobs[id].n;
            let pixels = images
                .pixels
                .get(first * per_image..(first + n) * per_image)
                .ok_or_else(|| EngineError::Compute("VAE returned too few images".into()))?;
            first += n;
            out.push((
                *id,
                RgbImages {
                    pixels: pixels.into(),
                    n,
                    height: images.height,
                    width: images.width,
                },
            ));
        }
        Ok(out)
    }
}

impl StageEngine for VaeEngine {
    fn admit(&mut self, job: JobId, input: StageInput) -> Result<usize, EngineError> {
        let latents = input
            .upstream
            .into_iter()
            .find_map(|p| match p {
                Payload::Latents(l) => Some(l),
                _ => None,
            })
            .ok_or_else(|| EngineError::InvalidInput("no latents arrived from the DiT".into()))?;
        if latents.channels != self.vae.latent_channels() {
            return Err(EngineError::InvalidInput(format!(
                "latents have {} channels, the VAE takes {}",
                latents.channels,
                self.vae.latent_channels()
            )));
        }
        let expected = latents.n * latents.channels * latents.height * latents.width;
        if latents.n == 0 || latents.data.len() != expected {
            return Err(EngineError::InvalidInput(format!(
                "latents hold {} values, their shape says {expected}",
                latents.data.len()
            )));
        }
        self.jobs.insert(job, latents);
        Ok(0)
    }

    fn pending_input(&self, _job: JobId) -> usize {
        0
    }

    fn step(
        &mut self,
        work: &[StepWork],
        emit: &mut dyn FnMut(JobId, StageEvent),
    ) -> Result<(), EngineError> {
        let mut groups: BTreeMap<(usize, usize), Vec<JobId>> = BTreeMap::new();
        for w in work {
            if let Some(l) = self.jobs.get(&w.job) {
                groups.entry((l.height, l.width)).or_default().push(w.job);
            }
        }
        for ids in groups.values() {
            let result = self.decode_group(ids);
            for id in ids {
                self.jobs.remove(id);
            }
            match result {
                Ok(images) => {
                    for (id, images) in images {
                        self.images_total += images.n as u64;
                        emit(id, StageEvent::Output(vec![Payload::Image(images)]));
                        emit(
                            id,
                            StageEvent::Finished {
                                reason: FinishReason::Complete,
                                usage: Usage::default(),
                            },
                        );
                    }
                }
                Err(e) => {
                    for id in ids {
                        emit(*id, StageEvent::Failed(e.clone()));
                    }
                }
            }
        }
        Ok(())
    }

    fn release(&mut self, job: JobId) {
        self.jobs.remove(&job);
    }

    fn state_bytes(&self) -> usize {
        self.jobs.values().map(|l| l.data.len() * 4).sum()
    }

    fn stats(&self) -> EngineStats {
        EngineStats {
            state_bytes: self.state_bytes(),
            images_total: self.images_total,
            ..EngineStats::default()
        }
    }
}
