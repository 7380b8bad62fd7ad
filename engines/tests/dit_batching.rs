//! Step-level continuous batching in the DiT stage: a request's image does not depend on which
//! other requests shared its forwards, when they joined or when they left.

use candle_core::{DType, Device};
use omnistage_engines::diffusion::model::Denoiser;
use omnistage_engines::diffusion::scheduler::{FlowMatchScheduler, ScheduleStyle};
use omnistage_engines::diffusion::sd3::Sd3Transformer;
use omnistage_engines::diffusion::stage::{DitEngine, DitSettings, TextEncoderEngine};
use omnistage_engines::diffusion::text::llm::LlmPromptEncoder;
use omnistage_engines::tiny::write_tiny_image_pipeline;
use omnistage_stages::deploy::ImageSettings;
use omnistage_stages::{
    ImageParams, JobId, JobRequest, Latents, Payload, Prompt, SamplingParams, StageEngine,
    StageEvent, StageInput, StepWork,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn limits() -> ImageSettings {
    ImageSettings {
        min_size: 16,
        max_size: 256,
        default_width: 64,
        default_height: 64,
        max_n: 4,
        default_steps: 6,
        max_steps: 50,
        default_guidance_scale: 4.0,
        step_cache: false,
        step_cache_threshold: 0.2,
        max_text_tokens: 16,
    }
}

fn params(seed: u64, size: (usize, usize), n: usize, steps: usize, cache: bool) -> ImageParams {
    ImageParams {
        width: size.0,
        height: size.1,
        n,
        steps,
        guidance_scale: 4.0,
        negative_prompt: Some("blurry".into()),
        seed,
        step_cache: cache,
    }
}

fn request(id: u64, prompt: &str, image: ImageParams) -> Arc<JobRequest> {
    Arc::new(JobRequest {
        id: JobId(id),
        prompt: Prompt::Completion(prompt.into()),
        sampling: SamplingParams::default(),
        outputs: vec![omnistage_stages::Modality::Image],
        deadline: Instant::now() + Duration::from_secs(600),
        image: Some(image),
        media: Vec::new(),
        audio: None,
        route: Default::default(),
    })
}

struct Pipeline {
    encoder: TextEncoderEngine<LlmPromptEncoder>,
    dit: DitEngine<Sd3Transformer>,
}

fn pipeline(dir: &Path) -> Pipeline {
    let device = Device::Cpu;
    let encoder = LlmPromptEncoder::load(
        &dir.join("text_encoder"),
        &dir.join("tokenizer"),
        16,
        DType::F32,
        &device,
    )
    .unwrap();
    let model = Sd3Transformer::load(&dir.join("transformer"), DType::F32, &device).unwrap();
    let scheduler = FlowMatchScheduler::load(&dir.join("scheduler/scheduler_config.json")).unwrap();
    let settings = DitSettings {
        scheduler,
        style: ScheduleStyle::TrainingRange,
        vae_scale: 4,
        limits: limits(),
    };
    Pipeline {
        encoder: TextEncoderEngine::new(encoder),
        dit: DitEngine::new(model, settings, device),
    }
}

impl Pipeline {
    /// Encodes the request's prompt and admits it to the DiT.
    fn admit(&mut self, req: Arc<JobRequest>) {
        let id = req.id;
        let input = StageInput {
            request: req.clone(),
            upstream: vec![],
            client_facing: false,
            streaming: false,
        };
        self.encoder.admit(id, input).unwrap();
        let mut cond = None;
        self.encoder
            .step(
                &[StepWork {
                    job: id,
                    token_budget: 1,
                }],
                &mut |_, ev| {
                    if let StageEvent::Output(p) = ev {
                        cond = p.into_iter().next();
                    }
                },
            )
            .unwrap();
        let input = StageInput {
            request: req,
            upstream: vec![cond.expect("conditioning")],
            client_facing: false,
            streaming: false,
        };
        self.dit.admit(id, input).unwrap();
    }

    /// One scheduler step over `running`; finished jobs leave `running` and land in `done`.
    fn step(&mut self, running: &mut Vec<JobId>, done: &mut HashMap<JobId, Latents>) {
        let work: Vec<StepWork> = running
            .iter()
            .map(|&job| StepWork {
                job,
                token_budget: 1,
            })
            .collect();
        self.dit
            .step(&work, &mut |id, ev| match ev {
                StageEvent::Output(p) => {
                    if let Some(Payload::Latents(l)) = p.into_iter().next() {
                        done.insert(id, l);
                    }
                }
                StageEvent::Failed(e) => panic!("{id}: {e}"),
                StageEvent::Finished { .. } | StageEvent::Admitted | StageEvent::Consumed(_) => {}
            })
            .unwrap();
        running.retain(|id| !done.contains_key(id));
    }
}

fn run_alone(dir: &Path, req: Arc<JobRequest>) -> Latents {
    let mut p = pipeline(dir);
    let id = req.id;
    p.admit(req);
    let (mut running, mut done) = (vec![id], HashMap::new());
    while !running.is_empty() {
        p.step(&mut running, &mut done);
    }
    done.remove(&id).unwrap()
}

fn max_diff(a: &Latents, b: &Latents) -> f32 {
    assert_eq!(
        (a.n, a.channels, a.height, a.width),
        (b.n, b.channels, b.height, b.width)
    );
    a.data
        .iter()
        .zip(b.data.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs `target` while others join before it, join after it, leave during it, and one of another
/// shape runs alongside; returns the target's latents.
fn run_crowded(dir: &Path, target: Arc<JobRequest>, cache: bool) -> Latents {
    let mut p = pipeline(dir);
    let (mut running, mut done) = (Vec::new(), HashMap::new());
    p.admit(request(
        10,
        "a lighthouse at dusk",
        params(5, (64, 64), 1, 3, cache),
    ));
    p.admit(request(11, "two cats", params(6, (64, 64), 2, 9, cache)));
    running.extend([JobId(10), JobId(11)]);
    p.step(&mut running, &mut done);
    let id = target.id;
    p.admit(target);
    running.push(id);
    p.step(&mut running, &mut done);
    p.admit(request(
        12,
        "a wide field",
        params(7, (96, 48), 1, 4, cache),
    ));
    p.admit(request(
        13,
        "the same shape",
        params(8, (64, 64), 1, 2, !cache),
    ));
    running.extend([JobId(12), JobId(13)]);
    while running.contains(&id) {
        p.step(&mut running, &mut done);
    }
    assert!(
        done.contains_key(&JobId(10)),
        "job 10 left before the target finished"
    );
    done.remove(&id).unwrap()
}

#[test]
fn an_image_is_the_same_alone_and_batched_with_joining_and_leaving_requests() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_image_pipeline(dir.path(), 0).unwrap();
    let target = || {
        request(
            1,
            "a red fox in the snow",
            params(42, (64, 64), 2, 6, false),
        )
    };
    let alone = run_alone(dir.path(), target());
    let crowded = run_crowded(dir.path(), target(), false);
    let diff = max_diff(&alone, &crowded);
    assert!(diff <= 1e-5, "max abs difference {diff}");
    // The images are not trivially equal: a different seed gives different latents.
    let other = run_alone(
        dir.path(),
        request(
            1,
            "a red fox in the snow",
            params(43, (64, 64), 2, 6, false),
        ),
    );
    assert!(max_diff(&alone, &other) > 0.1);
}

#[test]
fn step_caching_gives_the_same_image_alone_and_batched() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_image_pipeline(dir.path(), 0).unwrap();
    let target = || {
        request(
            1,
            "a red fox in the snow",
            params(42, (64, 64), 1, 12, true),
        )
    };
    let alone = run_alone(dir.path(), target());
    let crowded = run_crowded(dir.path(), target(), true);
    let diff = max_diff(&alone, &crowded);
    assert!(diff <= 1e-5, "max abs difference {diff}");
}

#[test]
fn bad_requests_are_refused_with_the_allowed_range() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_image_pipeline(dir.path(), 0).unwrap();
    let mut p = pipeline(dir.path());
    assert_eq!(p.dit.model().info().architecture, "sd3");
    for (image, words) in [
        (params(1, (72, 64), 1, 4, false), "multiples of 16"),
        (params(1, (512, 64), 1, 4, false), "[16, 256]"),
        (params(1, (64, 64), 5, 4, false), "[1, 4]"),
        (params(1, (64, 64), 1, 51, false), "[1, 50]"),
    ] {
        let input = StageInput {
            request: request(1, "x", image),
            upstream: vec![],
            client_facing: false,
            streaming: false,
        };
        let err = p.dit.admit(JobId(1), input).unwrap_err().to_string();
        assert!(err.contains(words), "{err}");
    }
    // A request without conditioning is refused too.
    let input = StageInput {
        request: request(2, "x", params(1, (64, 64), 1, 4, false)),
        upstream: vec![],
        client_facing: false,
        streaming: false,
    };
    assert!(p
        .dit
        .admit(JobId(2), input)
        .unwrap_err()
        .to_string()
        .contains("embeddings"));
}
