//! The DiT stage engine: flow-matching denoising with step-level continuous batching.
//!
//! Every scheduler step runs one denoising step for every job in the step's work: jobs are grouped
//! by latent shape and text length, and each group runs one transformer forward whose rows carry
//! their own sigma, so requests at different steps share a forward; a job finishes after its last
//! step and leaves, and new jobs join at the next step. Classifier-free guidance puts a job's
//! conditional and unconditional rows in the same forward.
//!
//! A job's result depends only on its own inputs: initial noise is a function of (seed, image
//! index), and every row of a batched forward is computed from its own row alone — up to float
//! rounding, since a batched matmul may sum in another order (latents stay within 1e-5 of the
//! job run alone; a PNG channel may then differ by one level).

use super::step_cache::StepCache;
use crate::diffusion::model::{DenoiseInput, Denoiser};
use crate::diffusion::noise::gaussian;
use crate::diffusion::scheduler::{FlowMatchScheduler, ScheduleStyle};
use crate::diffusion::DiffusionError;
use candle_core::{Device, Tensor};
use omnistage_stages::deploy::{ImageSettings, IMAGE_SIDE_MULTIPLE};
use omnistage_stages::{
    Conditioning, EngineError, EngineStats, FinishReason, ImageParams, JobId, Latents, Payload,
    StageEngine, StageEvent, StageInput, StepWork, Usage,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Everything a DiT engine needs besides its model.
pub struct DitSettings {
    pub scheduler: FlowMatchScheduler,
    pub style: ScheduleStyle,
    /// Pixels per latent cell (the VAE's downscale factor).
    pub vae_scale: usize,
    pub limits: ImageSettings,
}

/// Counters of a DiT engine, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DitCounters {
    /// Denoising steps completed, summed over images.
    pub image_steps_total: u64,
    /// Image steps whose block stack was skipped by the step cache.
    pub cached_image_steps_total: u64,
    /// Transformer forwards run (one per shape group per step).
    pub forwards_total: u64,
    /// Rows over all forwards.
    pub rows_total: u64,
}

struct DitJob {
    n: usize,
    channels: usize,
    height: usize,
    width: usize,
    /// `[n, C, h, w]` current latents.
    latents: Tensor,
    sigmas: Vec<f32>,
    step: usize,
    guidance: f32,
    cfg: bool,
    /// `[rows, L, D]` and `[rows, P]`: `n` conditional rows, then `n` unconditional ones with
    /// classifier-free guidance.
    context: Tensor,
    pooled: Tensor,
    cache: Option<StepCache>,
}

impl DitJob {
    fn rows(&self) -> usize {
        if self.cfg {
            2 * self.n
        } else {
            self.n
        }
    }

    fn steps(&self) -> usize {
        self.sigmas.len() - 1
    }

    /// Jobs share a forward when their latents and text have the same shape.
    fn group_key(&self) -> (usize, usize, usize) {
        (self.height, self.width, self.context.dim(1).unwrap_or(0))
    }
}

/// The DiT stage's engine over a denoiser `M`.
pub struct DitEngine<M: Denoiser> {
    model: M,
    settings: DitSettings,
    device: Device,
    jobs: HashMap<JobId, DitJob>,
    counters: DitCounters,
}

impl<M: Denoiser> DitEngine<M> {
    pub fn new(model: M, settings: DitSettings, device: Device) -> Self {
        Self {
            model,
            settings,
            device,
            jobs: HashMap::new(),
            counters: DitCounters::default(),
        }
    }

    pub fn counters(&self) -> DitCounters {
        self.counters
    }

    pub fn model(&self) -> &M {
        &self.model
    }

    fn check_params(&self, p: &ImageParams) -> Result<(), EngineError> {
        let l = &self.settings.limits;
        let info = self.model.info();
        // Sides must fit whole patches of latents, and the API's multiple of 16.
        let patch = self.settings.vae_scale * info.latent_multiple;
        let cell = patch / gcd(patch, IMAGE_SIDE_MULTIPLE) * IMAGE_SIDE_MULTIPLE;
        for (name, v) in [("width", p.width), ("height", p.height)] {
            if v < l.min_size || v > l.max_size || v % cell != 0 {
                return Err(EngineError::InvalidInput(format!(
                    "{name} {v} is out of range: sizes must be multiples of {cell} in [{}, {}]",
                    l.min_size, l.max_size
                )));
            }
            if let Some(max) = info.max_latent_side {
                if v / self.settings.vae_scale > max {
                    return Err(EngineError::InvalidInput(format!(
                        "{name} {v} exceeds the model's largest side of {} pixels",
                        max * self.settings.vae_scale
                    )));
                }
            }
        }
        if p.n == 0 || p.n > l.max_n {
            return Err(EngineError::InvalidInput(format!(
                "n {} is out of range [1, {}]",
                p.n, l.max_n
            )));
        }
        if p.steps == 0 || p.steps > l.max_steps {
            return Err(EngineError::InvalidInput(format!(
                "steps {} is out of range [1, {}]",
                p.steps, l.max_steps
            )));
        }
        if !(p.guidance_scale.is_finite() && p.guidance_scale >= 0.0) {
            return Err(EngineError::InvalidInput(format!(
                "guidance_scale {} must be a finite number >= 0",
                p.guidance_scale
            )));
        }
        Ok(())
    }

    fn text_rows(
        &self,
        cond: &Conditioning,
        n: usize,
        cfg: bool,
    ) -> Result<(Tensor, Tensor), EngineError> {
        let info = self.model.info();
        let mut embeddings = vec![&cond.positive];
        if cfg {
            embeddings.push(cond.negative.as_ref().ok_or_else(|| {
                EngineError::InvalidInput(
                    "classifier-free guidance needs the negative prompt's embedding".into(),
                )
            })?);
        }
        let len = cond.positive.tokens.rows;
        let mut contexts = Vec::new();
        let mut pooled = Vec::new();
        for e in embeddings {
            if e.tokens.dim != info.context_dim || e.tokens.rows != len || len == 0 {
                return Err(EngineError::InvalidInput(format!(
                    "text embedding is {}×{}, the model takes {len}×{} (same length for both prompts)",
                    e.tokens.rows, e.tokens.dim, info.context_dim
                )));
            }
            let p_dim = info.pooled_dim.max(1);
            let p: Vec<f32> = if info.pooled_dim == 0 {
                vec![0.0]
            } else if e.pooled.len() == info.pooled_dim {
                e.pooled.to_vec()
            } else {
                return Err(EngineError::InvalidInput(format!(
                    "pooled text embedding has {} values, the model takes {}",
                    e.pooled.len(),
                    info.pooled_dim
                )));
            };
            let c = Tensor::from_slice(&e.tokens.data, (1, len, e.tokens.dim), &self.device)
                .map_err(compute)?;
            let p = Tensor::from_vec(p, (1, p_dim), &self.device).map_err(compute)?;
            for _ in 0..n {
                contexts.push(c.clone());
                pooled.push(p.clone());
            }
        }
        Ok((
            Tensor::cat(&contexts, 0).map_err(compute)?,
            Tensor::cat(&pooled, 0).map_err(compute)?,
        ))
    }

    /// One denoising step for the jobs of one shape group.
    fn step_group(&mut self, ids: &[JobId]) -> Result<(), DiffusionError> {
        let jobs: Vec<&DitJob> = ids.iter().filter_map(|id| self.jobs.get(id)).collect();
        let mut xs = Vec::new();
        let mut sigmas = Vec::new();
        let mut contexts = Vec::new();
        let mut pooled = Vec::new();
        let mut guidance = Vec::new();
        for job in &jobs {
            xs.push(job.latents.clone());
            if job.cfg {
                xs.push(job.latents.clone());
            }
            sigmas.extend(std::iter::repeat_n(job.sigmas[job.step], job.rows()));
            guidance.extend(std::iter::repeat_n(job.guidance, job.rows()));
            contexts.push(job.context.clone());
            pooled.push(job.pooled.clone());
        }
        let rows = sigmas.len();
        let x = Tensor::cat(&xs, 0)?;
        let sigmas = Tensor::from_vec(sigmas, rows, &self.device)?;
        let context = Tensor::cat(&contexts, 0)?;
        let pooled = Tensor::cat(&pooled, 0)?;
        let guidance = Tensor::from_vec(guidance, rows, &self.device)?;
        let input = DenoiseInput {
            latents: &x,
            sigmas: &sigmas,
            context: &context,
            pooled: &pooled,
            guidance: self.model.info().guidance_embedding.then_some(&guidance),
        };
        let embedded = self.model.embed(&input)?;
        let velocity = self.velocity(ids, &embedded)?;
        self.counters.forwards_total += 1;
        self.counters.rows_total += rows as u64;

        let mut offset = 0;
        for id in ids {
            let Some(job) = self.jobs.get_mut(id) else {
                continue;
            };
            let rows = job.rows();
            let v = velocity.narrow(0, offset, rows)?;
            offset += rows;
            let v = if job.cfg {
                let cond = v.narrow(0, 0, job.n)?;
                let uncond = v.narrow(0, job.n, job.n)?;
                // uncond + g · (cond − uncond), as diffusers' SD3 pipeline.
                (&uncond + ((cond - &uncond)? * f64::from(job.guidance))?)?
            } else {
                v
            };
            let dt = job.sigmas[job.step + 1] - job.sigmas[job.step];
            job.latents = (&job.latents + (v * f64::from(dt))?)?;
            job.step += 1;
            self.counters.image_steps_total += job.n as u64;
        }
        Ok(())
    }

    /// The batch's velocity, running the block stack only for rows whose job does not reuse its
    /// cached residual this step.
    fn velocity(
        &mut self,
        ids: &[JobId],
        embedded: &M::Embedded,
    ) -> Result<Tensor, DiffusionError> {
        let threshold = self.settings.limits.step_cache_threshold;
        let any_cache = ids
            .iter()
            .any(|id| self.jobs.get(id).is_some_and(|j| j.cache.is_some()));
        if !any_cache {
            let hidden = self.model.run_blocks(embedded)?;
            return self.model.head(embedded, &hidden);
        }
        let modulated = self.model.modulated_input(embedded)?;
        let stack_input = self.model.stack_input(embedded)?;
        // Per job: (first row, rows, computes this step).
        let mut plan = Vec::with_capacity(ids.len());
        let mut offset = 0;
        for id in ids {
            let Some(job) = self.jobs.get_mut(id) else {
                continue;
            };
            let (rows, images) = (job.rows(), job.n);
            let (step, steps) = (job.step, job.steps());
            let compute = match job.cache.as_mut() {
                Some(cache) => cache.must_compute(
                    &modulated.narrow(0, offset, rows)?,
                    step,
                    steps,
                    threshold,
                )?,
                None => true,
            };
            plan.push((*id, offset, rows, images, compute));
            offset += rows;
        }
        let computed_rows: Vec<usize> = plan
            .iter()
            .filter(|p| p.4)
            .flat_map(|p| p.1..p.1 + p.2)
            .collect();
        let computed = if computed_rows.is_empty() {
            None
        } else if computed_rows.len() == offset {
            Some(self.model.run_blocks(embedded)?)
        } else {
            let sub = self.model.select_rows(embedded, &computed_rows)?;
            Some(self.model.run_blocks(&sub)?)
        };
        let mut parts = Vec::with_capacity(plan.len());
        let mut computed_offset = 0;
        for (id, offset, rows, images, compute) in plan {
            let input = stack_input.narrow(0, offset, rows)?;
            let job = self.jobs.get_mut(&id);
            let cache = job.and_then(|j| j.cache.as_mut());
            if compute {
                let out = computed
                    .as_ref()
                    .ok_or_else(|| DiffusionError::Input("no computed rows".into()))?
                    .narrow(0, computed_offset, rows)?;
                computed_offset += rows;
                if let Some(cache) = cache {
                    cache.store((&out - &input)?);
                }
                parts.push(out);
            } else {
                let cache = cache.ok_or_else(|| DiffusionError::Input("no step cache".into()))?;
                self.counters.cached_image_steps_total += images as u64;
                parts.push(cache.reuse(&input)?);
            }
        }
        let hidden = Tensor::cat(&parts, 0)?;
        self.model.head(embedded, &hidden)
    }

    fn finish(&mut self, id: JobId, emit: &mut dyn FnMut(JobId, StageEvent)) {
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        match job.latents.flatten_all().and_then(|t| t.to_vec1::<f32>()) {
            Ok(data) => {
                emit(
                    id,
                    StageEvent::Output(vec![Payload::Latents(Latents {
                        data: data.into(),
                        n: job.n,
                        channels: job.channels,
                        height: job.height,
                        width: job.width,
                    })]),
                );
                emit(
                    id,
                    StageEvent::Finished {
                        reason: FinishReason::Complete,
                        usage: Usage::default(),
                    },
                );
            }
            Err(e) => emit(id, StageEvent::Failed(compute(e))),
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a.max(1)
    } else {
        gcd(b, a % b)
    }
}

fn compute(e: impl std::fmt::Display) -> EngineError {
    EngineError::Compute(e.to_string())
}

impl<M: Denoiser> StageEngine for DitEngine<M> {
    fn admit(&mut self, job: JobId, input: StageInput) -> Result<usize, EngineError> {
        let params = input.request.image.as_ref().ok_or_else(|| {
            EngineError::InvalidInput(
                "this stage generates images; the request asks for none".into(),
            )
        })?;
        self.check_params(params)?;
        let cond: Arc<Conditioning> = input
            .upstream
            .iter()
            .find_map(|p| match p {
                Payload::Embeddings(c) => Some(c.clone()),
                _ => None,
            })
            .ok_or_else(|| {
                EngineError::InvalidInput("no text embeddings arrived from the encoder".into())
            })?;
        let info = self.model.info().clone();
        let cfg = !info.guidance_embedding && params.guidance_scale > 1.0;
        let (context, pooled) = self.text_rows(&cond, params.n, cfg)?;
        let (channels, height, width) = (
            info.latent_channels,
            params.height / self.settings.vae_scale,
            params.width / self.settings.vae_scale,
        );
        let per_image = channels * height * width;
        let mut noise = Vec::with_capacity(params.n * per_image);
        for i in 0..params.n {
            noise.extend(gaussian(params.seed, i as u64, per_image));
        }
        let latents = Tensor::from_vec(noise, (params.n, channels, height, width), &self.device)
            .map_err(compute)?;
        let tokens = (height / info.latent_multiple) * (width / info.latent_multiple);
        let sigmas = self
            .settings
            .scheduler
            .sigmas(params.steps, self.settings.style, tokens);
        self.jobs.insert(
            job,
            DitJob {
                n: params.n,
                channels,
                height,
                width,
                latents,
                sigmas,
                step: 0,
                guidance: params.guidance_scale as f32,
                cfg,
                context,
                pooled,
                cache: params.step_cache.then(StepCache::default),
            },
        );
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
        let mut groups: BTreeMap<(usize, usize, usize), Vec<JobId>> = BTreeMap::new();
        for w in work {
            if let Some(job) = self.jobs.get(&w.job) {
                groups.entry(job.group_key()).or_default().push(w.job);
            }
        }
        for ids in groups.values() {
            if let Err(e) = self.step_group(ids) {
                for id in ids {
                    self.jobs.remove(id);
                    emit(*id, StageEvent::Failed(compute(&e)));
                }
                continue;
            }
            for id in ids {
                if self.jobs.get(id).is_some_and(|j| j.step >= j.steps()) {
                    self.finish(*id, emit);
                }
            }
        }
        Ok(())
    }

    fn release(&mut self, job: JobId) {
        self.jobs.remove(&job);
    }

    fn stats(&self) -> EngineStats {
        let c = self.counters;
        EngineStats {
            state_bytes: self.state_bytes(),
            denoise_image_steps_total: c.image_steps_total,
            denoise_cached_image_steps_total: c.cached_image_steps_total,
            denoise_forwards_total: c.forwards_total,
            denoise_rows_total: c.rows_total,
            ..EngineStats::default()
        }
    }

    fn state_bytes(&self) -> usize {
        self.jobs
            .values()
            .map(|j| (j.latents.elem_count() + j.context.elem_count() + j.pooled.elem_count()) * 4)
            .sum()
    }
}
