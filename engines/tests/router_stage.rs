//! The router stage through the factory: the model form on the tiny router (scores are a
//! softmax, the top `k` are selected in score order, a prompt scores the same alone or batched,
//! mean pooling matches a direct `BertModel` forward, requests may change `k`, bad input is
//! refused) and the rule form (each condition, the default, first-match order).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use omnistage_engines::factory::{build_engine, BuildError, StageWiring};
use omnistage_engines::router::{RouterModel, ENCODER_DIR, HEAD_FILE, ROUTER_CONFIG_FILE};
use omnistage_engines::tiny::{write_mot, write_tiny_router, TINY_MOT_EXPERTS};
use omnistage_stages::deploy::DeployGraph;
use omnistage_stages::{
    ChatMessage, EngineError, FinishReason, JobId, JobRequest, MediaInput, Modality, Payload,
    Prompt, RouteDecision, RouteRequest, SamplingParams, StageEngine, StageEvent, StageInput,
    StepWork, Usage,
};

const EXPERTS: [&str; 3] = ["small", "medium", "large"];
const STAGES: [&str; 3] = ["e-small", "e-medium", "e-large"];
const SEED: u64 = 11;
const TOL: f32 = 1e-5;

/// The deployment: a router stage (with `model_line` and `router_table`) over llm experts, the
/// experts of one Mixture-of-Thoughts checkpoint when `mot` (so that `k` may exceed 1).
fn graph(
    dir: &Path,
    model_line: &str,
    router_table: &str,
    experts: &[&str],
    mot: bool,
) -> DeployGraph {
    let list = experts
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut text = format!(
        r#"
name = "routed"

[[stage]]
id = "router"
kind = "router"
{model_line}
dtype = "f32"
device = "cpu"

[stage.router]
experts = [{list}]
{router_table}
"#
    );
    for (i, e) in experts.iter().enumerate() {
        if mot {
            text.push_str(&format!(
                "\n[[stage]]\nid = \"{e}\"\nkind = \"llm\"\nmodel = \"mot\"\n\n[stage.mot]\nexpert = \"{}\"\n",
                EXPERTS[i % EXPERTS.len()]
            ));
        } else {
            text.push_str(&format!(
                "\n[[stage]]\nid = \"{e}\"\nkind = \"llm\"\nmodel = \"experts/{e}\"\n"
            ));
        }
    }
    for e in experts {
        text.push_str(&format!(
            "\n[[edge]]\nfrom = \"router\"\nto = \"{e}\"\ncarries = \"route\"\n"
        ));
    }
    text.push_str("\n[outputs]\ntext = \"router\"\n");
    DeployGraph::from_toml_str(&text, &dir.join("deploy.toml"), dir, &[])
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn build(graph: &DeployGraph) -> Result<Box<dyn StageEngine>, BuildError> {
    let spec = graph.stage("router").unwrap();
    build_engine(spec, &StageWiring::default())
}

/// A tiny router at `dir/router` scoring [`EXPERTS`], and its model-form engine over [`STAGES`].
fn model_router(dir: &Path, k: usize) -> Box<dyn StageEngine> {
    write_tiny_router(&dir.join("router"), &EXPERTS, SEED).unwrap();
    let g = graph(
        dir,
        "model = \"router\"",
        &format!("k = {k}"),
        &STAGES,
        true,
    );
    build(&g).unwrap_or_else(|e| panic!("{e}"))
}

struct Req {
    prompt: Prompt,
    outputs: Vec<Modality>,
    media: Vec<MediaInput>,
    route: RouteRequest,
}

impl Req {
    fn text(t: &str) -> Self {
        Self {
            prompt: Prompt::Completion(t.into()),
            outputs: vec![Modality::Text],
            media: Vec::new(),
            route: RouteRequest::default(),
        }
    }

    fn k(mut self, k: usize) -> Self {
        self.route.k = Some(k);
        self
    }

    fn input(self, id: u64) -> StageInput {
        StageInput {
            request: Arc::new(JobRequest {
                id: JobId(id),
                prompt: self.prompt,
                sampling: SamplingParams::default(),
                outputs: self.outputs,
                deadline: Instant::now() + Duration::from_secs(60),
                image: None,
                audio: None,
                media: self.media,
                route: self.route,
            }),
            upstream: Vec::new(),
            client_facing: false,
            streaming: false,
        }
    }
}

/// Admits every request, runs them in one step, and returns each decision in order. Checks the
/// events: one `route` output then `Finished(Stop)` with no usage, and no state left.
fn run(engine: &mut dyn StageEngine, reqs: Vec<Req>) -> Vec<RouteDecision> {
    let mut work = Vec::new();
    for (i, r) in reqs.into_iter().enumerate() {
        let job = JobId(i as u64);
        let cost = engine.admit(job, r.input(i as u64)).unwrap();
        assert_eq!(engine.pending_input(job), cost);
        work.push(StepWork {
            job,
            token_budget: cost.max(1),
        });
    }
    let mut decisions: HashMap<JobId, RouteDecision> = HashMap::new();
    let mut finished = Vec::new();
    engine
        .step(&work, &mut |job, ev| match ev {
            StageEvent::Output(p) => match &p[..] {
                [Payload::Route(d)] => {
                    assert!(decisions.insert(job, (**d).clone()).is_none());
                }
                other => panic!("unexpected output {other:?}"),
            },
            StageEvent::Finished { reason, usage } => {
                assert!(decisions.contains_key(&job), "output before finish");
                assert_eq!((reason, usage), (FinishReason::Stop, Usage::default()));
                finished.push(job);
            }
            other => panic!("unexpected event {other:?}"),
        })
        .unwrap();
    assert_eq!(finished.len(), work.len());
    assert_eq!(engine.state_bytes(), 0);
    assert_eq!(engine.stats().state_bytes, 0);
    (0..work.len())
        .map(|i| decisions.remove(&JobId(i as u64)).unwrap())
        .collect()
}

fn probs(d: &RouteDecision) -> Vec<f32> {
    d.scores.iter().map(|(_, p)| *p).collect()
}

fn invalid(engine: &mut dyn StageEngine, req: Req) -> String {
    match engine.admit(JobId(99), req.input(99)) {
        Err(EngineError::InvalidInput(m)) => {
            assert_eq!(engine.state_bytes(), 0);
            m
        }
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

const PROMPTS: [&str; 6] = [
    "hi",
    "Write a Python function that sorts a list of numbers.",
    "What is the capital of France?",
    "Translate 'good morning' into German, please.",
    "the station was quiet at night",
    "Prove that the square root of two is irrational.",
];

#[test]
fn the_model_form_scores_every_expert_and_selects_the_top_k_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let mut engine = model_router(tmp.path(), 1);
    for k in [1, 2, 3] {
        let reqs = PROMPTS.iter().map(|p| Req::text(p).k(k)).collect();
        for d in run(engine.as_mut(), reqs) {
            let names: Vec<&str> = d.scores.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, STAGES, "scores are in the router's experts order");
            let p = probs(&d);
            assert!((p.iter().sum::<f32>() - 1.0).abs() < TOL, "{p:?}");
            assert!(p.iter().all(|x| *x > 0.0 && *x < 1.0));
            assert_eq!(d.reason, "model");
            assert_eq!(d.selected.len(), k);
            let score = |s: &str| p[STAGES.iter().position(|x| *x == s).unwrap()];
            for w in d.selected.windows(2) {
                assert!(score(&w[0]) >= score(&w[1]), "{d:?}");
            }
            let argmax = (0..3).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
            assert_eq!(d.primary(), STAGES[argmax]);
            // Every unselected expert scores no more than the selected ones.
            let lowest = d.selected.iter().map(|s| score(s)).fold(1.0, f32::min);
            for s in STAGES.iter().filter(|s| !d.selects(s)) {
                assert!(score(s) <= lowest);
            }
        }
    }
}

#[test]
fn different_prompts_get_visibly_different_scores_and_primaries() {
    let tmp = tempfile::tempdir().unwrap();
    let mut engine = model_router(tmp.path(), 1);
    let decisions = run(
        engine.as_mut(),
        PROMPTS.iter().map(|p| Req::text(p)).collect(),
    );
    let primaries: std::collections::BTreeSet<&str> =
        decisions.iter().map(RouteDecision::primary).collect();
    assert!(primaries.len() >= 2, "every prompt went to {primaries:?}");
    let spread = decisions
        .iter()
        .flat_map(|a| decisions.iter().map(move |b| (a, b)))
        .map(|(a, b)| {
            probs(a)
                .iter()
                .zip(probs(b))
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max)
        })
        .fold(0.0, f32::max);
    assert!(spread > 0.1, "scores barely move across prompts: {spread}");
}

#[test]
fn a_batch_of_prompts_of_different_lengths_scores_as_each_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let mut engine = model_router(tmp.path(), 1);
    let mut reqs: Vec<Req> = PROMPTS.iter().map(|p| Req::text(p)).collect();
    reqs.push(Req {
        prompt: Prompt::Chat(vec![
            ChatMessage::text("system", "You are terse."),
            ChatMessage::text("user", "hello there"),
        ]),
        ..Req::text("")
    });
    let together = run(engine.as_mut(), reqs);
    for (i, d) in together.iter().enumerate() {
        let req = match PROMPTS.get(i) {
            Some(p) => Req::text(p),
            // The chat prompt scores its user text.
            None => Req::text("hello there"),
        };
        let alone = run(engine.as_mut(), vec![req]).remove(0);
        assert_eq!(alone.selected, d.selected);
        for (a, b) in probs(&alone).iter().zip(probs(d)) {
            assert!((a - b).abs() < TOL, "prompt {i}: {a} vs {b}");
        }
    }
}

#[test]
fn mean_pooling_and_the_head_match_a_direct_bert_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let mut engine = model_router(tmp.path(), 1);
    let dir = tmp.path().join("router");
    let enc = dir.join(ENCODER_DIR);
    let cfg: BertConfig =
        serde_json::from_str(&std::fs::read_to_string(enc.join("config.json")).unwrap()).unwrap();
    let dev = Device::Cpu;
    let weights = candle_core::safetensors::load(enc.join("model.safetensors"), &dev).unwrap();
    let bert = BertModel::load(VarBuilder::from_tensors(weights, DType::F32, &dev), &cfg).unwrap();
    let tok = tokenizers::Tokenizer::from_file(enc.join("tokenizer.json")).unwrap();
    let head = candle_core::safetensors::load(dir.join(HEAD_FILE), &dev).unwrap();
    let mat = |n: &str| head[n].to_vec2::<f32>().unwrap();
    let vec = |n: &str| head[n].to_vec1::<f32>().unwrap();
    let (w0, b0, w2, b2) = (
        mat("mlp.0.weight"),
        vec("mlp.0.bias"),
        mat("mlp.2.weight"),
        vec("mlp.2.bias"),
    );
    for prompt in PROMPTS {
        let ids = tok.encode(prompt, true).unwrap().get_ids().to_vec();
        let input = Tensor::new(ids.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let types = input.zeros_like().unwrap();
        let states = bert
            .forward(&input, &types, None)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(states.len(), ids.len());
        // Mean over the tokens.
        let d = states[0].len();
        let pooled: Vec<f32> = (0..d)
            .map(|j| states.iter().map(|r| r[j]).sum::<f32>() / states.len() as f32)
            .collect();
        // mlp.0, GELU (erf form, through candle's op), mlp.2, softmax.
        let hidden: Vec<f32> = w0
            .iter()
            .zip(&b0)
            .map(|(row, b)| row.iter().zip(&pooled).map(|(w, x)| w * x).sum::<f32>() + b)
            .collect();
        let hidden = Tensor::new(hidden.as_slice(), &dev)
            .unwrap()
            .gelu_erf()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let logits: Vec<f32> = w2
            .iter()
            .zip(&b2)
            .map(|(row, b)| row.iter().zip(&hidden).map(|(w, x)| w * x).sum::<f32>() + b)
            .collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
        let total: f32 = exp.iter().sum();
        let expected: Vec<f32> = exp.iter().map(|e| e / total).collect();
        let got = probs(&run(engine.as_mut(), vec![Req::text(prompt)]).remove(0));
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() < TOL, "{prompt:?}: {got:?} vs {expected:?}");
        }
    }
}

#[test]
fn requests_choose_k_and_bad_input_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut engine = model_router(tmp.path(), 2);
    let d = run(
        engine.as_mut(),
        vec![Req::text("hello"), Req::text("hello").k(3)],
    );
    assert_eq!(d[0].selected.len(), 2, "the stage's k");
    assert_eq!(d[1].selected.len(), 3, "the request's k");
    assert_eq!(d[0].selected[..], d[1].selected[..2]);
    for k in [0, 4] {
        let m = invalid(engine.as_mut(), Req::text("hello").k(k));
        assert!(m.contains(&format!("k = {k}")) && m.contains('3'), "{m}");
    }
    let m = invalid(
        engine.as_mut(),
        Req {
            prompt: Prompt::Tokens(vec![1, 2, 3]),
            ..Req::text("")
        },
    );
    assert!(m.contains("token ids"), "{m}");
    let m = invalid(engine.as_mut(), Req::text(""));
    assert!(m.contains("no text"), "{m}");
    // A chat with no user text has nothing to score either.
    invalid(
        engine.as_mut(),
        Req {
            prompt: Prompt::Chat(vec![ChatMessage::text("system", "x")]),
            ..Req::text("")
        },
    );
    // A released job leaves nothing behind.
    engine.admit(JobId(5), Req::text("hello").input(5)).unwrap();
    assert!(engine.state_bytes() > 0);
    engine.release(JobId(5));
    assert_eq!(engine.state_bytes(), 0);
}

#[test]
fn long_prompts_are_truncated_to_max_length() {
    let tmp = tempfile::tempdir().unwrap();
    let mut engine = model_router(tmp.path(), 1);
    let long = "the station was quiet at night ".repeat(100);
    let cost = engine.admit(JobId(1), Req::text(&long).input(1)).unwrap();
    let model = RouterModel::load(&tmp.path().join("router"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(cost, model.config().max_length);
    engine.release(JobId(1));
    let d = run(engine.as_mut(), vec![Req::text(&long)]).remove(0);
    assert!((probs(&d).iter().sum::<f32>() - 1.0).abs() < TOL);
}

#[test]
fn two_builds_decide_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = model_router(tmp.path(), 1);
    let other = tempfile::tempdir().unwrap();
    let mut b = model_router(other.path(), 1);
    let reqs = || PROMPTS.iter().map(|p| Req::text(p).k(3)).collect();
    assert_eq!(run(a.as_mut(), reqs()), run(b.as_mut(), reqs()));
}

#[test]
fn a_checkpoint_with_another_expert_count_is_refused_at_build() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny_router(&tmp.path().join("router"), &["small", "large"], SEED).unwrap();
    let g = graph(tmp.path(), "model = \"router\"", "k = 1", &STAGES, true);
    let e = build(&g).err().expect("the build must fail").to_string();
    for needle in ["small, large", "e-small, e-medium, e-large", "router"] {
        assert!(e.contains(needle), "{needle:?} missing from {e}");
    }
    let g = graph(tmp.path(), "model = \"missing\"", "k = 1", &STAGES, true);
    let e = build(&g).err().expect("the build must fail").to_string();
    assert!(e.contains(ROUTER_CONFIG_FILE), "{e}");
}

#[test]
fn the_tiny_mot_set_carries_its_router() {
    let tmp = tempfile::tempdir().unwrap();
    let files = write_mot(tmp.path(), 3).unwrap();
    let router = tmp.path().join("router");
    assert!(files.contains(&router.join(ROUTER_CONFIG_FILE)));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("mot_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["router"], "router");
    let model = RouterModel::load(&router, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.config().experts, TINY_MOT_EXPERTS);
    let tokens: Vec<Vec<u32>> = PROMPTS.iter().map(|p| model.tokenize(p).unwrap()).collect();
    let refs: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
    let primaries: std::collections::BTreeSet<usize> = model
        .score(&refs)
        .unwrap()
        .iter()
        .map(|p| (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap())
        .collect();
    assert!(
        primaries.len() >= 2,
        "the MoT router sends every prompt to {primaries:?}"
    );
    let again = tempfile::tempdir().unwrap();
    let files_again = write_mot(again.path(), 3).unwrap();
    for (a, b) in files.iter().zip(&files_again) {
        assert_eq!(
            std::fs::read(a).unwrap(),
            std::fs::read(b).unwrap(),
            "{a:?}"
        );
    }
}

/// A rule-form router over chat / vision / speech / code experts.
fn rule_router(dir: &Path) -> Box<dyn StageEngine> {
    let table = r#"k = 1
rules = ["input:image -> vision", "output:audio -> speech", "model:coder -> code"]
default = "chat""#;
    let g = graph(dir, "", table, &["chat", "vision", "speech", "code"], false);
    assert!(g.stage("router").unwrap().model.as_os_str().is_empty());
    build(&g).unwrap_or_else(|e| panic!("{e}"))
}

fn image() -> MediaInput {
    MediaInput::image(vec![7; 12], 2, 2).unwrap()
}

#[test]
fn the_rule_form_matches_each_condition_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let mut engine = rule_router(tmp.path());
    let with = |media: Vec<MediaInput>, outputs: Vec<Modality>, model: Option<&str>| Req {
        media,
        outputs,
        route: RouteRequest {
            model: model.map(str::to_string),
            k: None,
        },
        ..Req::text("hi")
    };
    let cases = vec![
        (
            with(vec![image()], vec![Modality::Text], None),
            "vision",
            "input:image -> vision",
        ),
        (
            with(vec![], vec![Modality::Text, Modality::Audio], None),
            "speech",
            "output:audio -> speech",
        ),
        (
            with(vec![], vec![Modality::Text], Some("coder")),
            "code",
            "model:coder -> code",
        ),
        // Nothing matches: the default.
        (
            with(vec![], vec![Modality::Text], Some("coder-2")),
            "chat",
            "default",
        ),
        // An audio clip is not an image.
        (
            with(
                vec![MediaInput::audio(vec![0.1; 16], 16_000).unwrap()],
                vec![Modality::Text],
                None,
            ),
            "chat",
            "default",
        ),
        // Several rules hold: the first one written wins.
        (
            with(vec![image()], vec![Modality::Audio], Some("coder")),
            "vision",
            "input:image -> vision",
        ),
        (
            with(vec![], vec![Modality::Audio], Some("coder")),
            "speech",
            "output:audio -> speech",
        ),
    ];
    let (reqs, expected): (Vec<Req>, Vec<(&str, &str)>) =
        cases.into_iter().map(|(r, e, why)| (r, (e, why))).unzip();
    let decisions = run(engine.as_mut(), reqs);
    for (d, (expert, reason)) in decisions.iter().zip(expected) {
        assert_eq!(d.selected, [expert]);
        assert_eq!(d.reason, reason);
        assert!(d.scores.is_empty());
    }
    // Token prompts need no text here.
    let d = run(
        engine.as_mut(),
        vec![Req {
            prompt: Prompt::Tokens(vec![1, 2]),
            ..Req::text("")
        }],
    );
    assert_eq!(d[0].primary(), "chat");
    // Rules pick one expert.
    let m = invalid(engine.as_mut(), Req::text("hi").k(2));
    assert!(m.contains("one expert"), "{m}");
    invalid(engine.as_mut(), Req::text("hi").k(0));
}

/// candle's `BertModel` turns its attention mask into NaN in f16/bf16, so a half-precision
/// router stage runs its encoder in f32 and decides exactly as an f32 one.
#[test]
fn a_half_precision_router_stage_runs_its_encoder_in_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let mut full = model_router(tmp.path(), 3);
    let g = graph(tmp.path(), "model = \"router\"", "k = 3", &STAGES, true);
    let reqs = || PROMPTS.iter().map(|p| Req::text(p)).collect();
    let want = run(full.as_mut(), reqs());
    for (dtype, candle) in [
        (omnistage_stages::deploy::DType::Bf16, DType::BF16),
        (omnistage_stages::deploy::DType::F16, DType::F16),
    ] {
        let model = RouterModel::load(&tmp.path().join("router"), candle, &Device::Cpu).unwrap();
        assert_eq!(model.encoder_dtype(), DType::F32);
        let mut spec = g.stage("router").unwrap().clone();
        spec.dtype = dtype;
        let mut half =
            build_engine(&spec, &StageWiring::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(run(half.as_mut(), reqs()), want, "{dtype:?}");
    }
}
