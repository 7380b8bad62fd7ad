//! The staged Mixture-of-Thoughts expert engine (`omnistage_engines::mot::engine`) on the tiny
//! MoT set, driven by hand the way the stage scheduler and the orchestrator drive it: every
//! expert is its own engine; peers' `mot_states` outputs travel to the primary through `feed`,
//! round-tripped through the wire encoding (as between processes); several unrelated jobs
//! share each step. Checked against the plain reference (`MotModel::forward`,
//! `MotModel::forward_continued`, `MotModel::generate_greedy`) and the plain expert.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use omnistage_connectors::wire;
use omnistage_engines::factory::{build_engine, StageWiring};
use omnistage_engines::llm::chat_template::ChatTemplate;
use omnistage_engines::llm::model::{LlmModel, SeqChunk};
use omnistage_engines::llm::tokenizer::TextTokenizer;
use omnistage_engines::mot::engine::{MotExpertEngine, MotExpertSettings};
use omnistage_engines::mot::{ExpertInput, MotConfig, MotModel, MOT_CONFIG_FILE};
use omnistage_engines::tiny::{write_mot, TINY_MOT_EXPERTS, TINY_MOT_STACKS};
use omnistage_stages::deploy::{DType as SpecDType, DeployGraph, MotSettings, StageSpec};
use omnistage_stages::{
    ChatMessage, EngineError, FinishReason, HiddenStates, JobId, JobRequest, Modality, MotStates,
    Payload, PayloadKind, Prompt, RouteDecision, SamplingParams, StageEngine, StageEvent,
    StageInput, StepWork, Usage,
};

const TOL: f32 = 1e-4;
const NEW_TOKENS: usize = 8;
const SMALL: usize = 0;
const MEDIUM: usize = 1;
const LARGE: usize = 2;

fn stage_id(expert: usize) -> String {
    format!("mot-{}", TINY_MOT_EXPERTS[expert])
}

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: Some(0.0),
        max_tokens: Some(NEW_TOKENS),
        ignore_eos: true,
        ..Default::default()
    }
}

fn request(id: u64, prompt: Prompt) -> Arc<JobRequest> {
    Arc::new(JobRequest {
        id: JobId(id),
        prompt,
        sampling: greedy(),
        outputs: vec![Modality::Text],
        deadline: Instant::now() + Duration::from_secs(60),
        image: None,
        audio: None,
        media: Vec::new(),
        route: Default::default(),
    })
}

fn decision(selected: &[usize]) -> Payload {
    Payload::Route(Arc::new(RouteDecision {
        selected: selected.iter().map(|&e| stage_id(e)).collect(),
        scores: Vec::new(),
        reason: "test".into(),
    }))
}

/// What the orchestrator gives an expert stage for a job routed to `selected` (primary first).
fn input(req: &Arc<JobRequest>, selected: &[usize], me: usize) -> StageInput {
    let primary = selected[0] == me;
    StageInput {
        request: req.clone(),
        upstream: vec![decision(selected)],
        client_facing: primary,
        streaming: primary && selected.len() > 1,
    }
}

fn load_expert(dir: &Path, expert: usize) -> MotExpertEngine {
    MotExpertEngine::load(
        dir,
        TINY_MOT_EXPERTS[expert],
        &stage_id(expert),
        &Device::Cpu,
        MotExpertSettings::default(),
    )
    .unwrap()
}

/// The prompt of `messages` in expert `expert`'s own tokenization (its chat template).
fn chat_tokens(dir: &Path, expert: usize, messages: &[ChatMessage]) -> Vec<u32> {
    let cfg = MotConfig::from_file(&dir.join(MOT_CONFIG_FILE)).unwrap();
    let edir = cfg.expert_dir(dir, expert).unwrap();
    let template = ChatTemplate::load(&edir).unwrap().unwrap();
    let text = template.render(messages, true).unwrap();
    TextTokenizer::load(&edir)
        .unwrap()
        .encode(&text, false)
        .unwrap()
}

/// The wire round trip a payload makes between processes.
fn over_the_wire(p: &Payload) -> Payload {
    wire::decode(&wire::encode(p).unwrap()).unwrap()
}

/// One scheduler step: every job in `jobs` that is not awaiting input, budget 64.
fn step(engine: &mut dyn StageEngine, jobs: &[JobId]) -> Vec<(JobId, StageEvent)> {
    let work: Vec<StepWork> = jobs
        .iter()
        .filter(|j| !engine.awaiting_input(**j))
        .map(|&job| StepWork {
            job,
            token_budget: 64,
        })
        .collect();
    let mut events = Vec::new();
    engine
        .step(&work, &mut |job, ev| events.push((job, ev)))
        .unwrap();
    events
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The plain expert's greedy continuation: a cache-less forward of the whole sequence per token.
fn plain_greedy(model: &LlmModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut tokens = prompt.to_vec();
    for _ in 0..n {
        let mut cache = model.new_cache();
        let out = model
            .forward(&mut [SeqChunk {
                tokens: &tokens,
                cache: &mut cache,
                want_hidden: false,
            }])
            .unwrap();
        let next = out
            .logits
            .squeeze(0)
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        tokens.push(next);
    }
    tokens[prompt.len()..].to_vec()
}

/// What one primary job streamed.
#[derive(Default)]
struct Streamed {
    tokens: Vec<u32>,
    text: String,
    /// `last_logits` after each token but the last (the job is released in that step).
    logits: Vec<Vec<f32>>,
    finished: Option<(FinishReason, Usage)>,
}

#[test]
fn staged_experts_match_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_mot(dir, 21).unwrap();
    let mut engines: Vec<MotExpertEngine> = (0..3).map(|e| load_expert(dir, e)).collect();

    // Job A: primary medium, peers small and large. Job B: primary large, peer small.
    // Job C: medium alone (K = 1, the routing-only baseline).
    let msgs_a = [ChatMessage::text(
        "user",
        "Think together about tiny models.",
    )];
    let msgs_b = [ChatMessage::text(
        "user",
        "Another question, routed elsewhere!",
    )];
    let (a, b, c) = (JobId(1), JobId(2), JobId(3));
    let req_a = request(1, Prompt::Chat(msgs_a.to_vec()));
    let req_b = request(2, Prompt::Chat(msgs_b.to_vec()));
    let req_c = request(3, Prompt::Completion("plain generation".into()));
    let routes: HashMap<JobId, Vec<usize>> = [
        (a, vec![MEDIUM, SMALL, LARGE]),
        (b, vec![LARGE, SMALL]),
        (c, vec![MEDIUM]),
    ]
    .into();
    let reqs: HashMap<JobId, &Arc<JobRequest>> = [(a, &req_a), (b, &req_b), (c, &req_c)].into();

    // Admit every job on every selected stage; the admitted jobs per stage.
    let mut live: Vec<Vec<JobId>> = vec![Vec::new(); 3];
    for job in [a, b, c] {
        let sel = &routes[&job];
        for &e in sel {
            let n = engines[e].admit(job, input(reqs[&job], sel, e)).unwrap();
            assert!(n > 0);
            live[e].push(job);
        }
    }
    // A primary first runs its own stack-0 layers (they need nothing from the peers), so
    // nothing awaits input yet; after one step, primaries with peers wait at the boundary.
    assert!(!engines[MEDIUM].awaiting_input(a));
    assert!(!engines[LARGE].awaiting_input(b));
    let idle_a = step(&mut engines[MEDIUM], &[a]);
    let idle_b = step(&mut engines[LARGE], &[b]);
    assert!(
        idle_a.is_empty() && idle_b.is_empty(),
        "{idle_a:?} {idle_b:?}"
    );
    assert!(engines[MEDIUM].awaiting_input(a));
    assert!(engines[LARGE].awaiting_input(b));
    assert!(!engines[MEDIUM].awaiting_input(c));
    assert!(!engines[SMALL].awaiting_input(a));
    assert!(engines[MEDIUM].pending_input(a) > 0);
    // Admission alone holds no tensors yet; a step does.
    let mut peak_bytes = 0;

    let mut streamed: HashMap<JobId, Streamed> = HashMap::new();
    let mut peers_done: HashMap<JobId, usize> = HashMap::new();
    let mut fed_rows: HashMap<JobId, usize> = HashMap::new();
    let mut consumed_rows: HashMap<JobId, usize> = HashMap::new();
    let mut states_sent: HashSet<(JobId, usize, usize)> = HashSet::new();
    let mut rounds = 0;
    while live.iter().any(|l| !l.is_empty()) {
        rounds += 1;
        assert!(rounds < 50, "no progress: {live:?}");
        // Peers first (small, then large), then the primaries: like three stage threads.
        for e in [SMALL, LARGE, MEDIUM] {
            let jobs = live[e].clone();
            let events = step(&mut engines[e], &jobs);
            peak_bytes = peak_bytes.max(engines[e].state_bytes());
            for (job, ev) in events {
                let sel = &routes[&job];
                let primary = sel[0];
                match ev {
                    StageEvent::Output(payloads) if primary != e => {
                        for p in payloads {
                            let Payload::MotStates(m) = &p else {
                                panic!("a peer sent {:?}", p.kind());
                            };
                            assert_eq!(m.expert, e);
                            assert!(states_sent.insert((job, e, m.stack)), "sent twice");
                            *fed_rows.entry(job).or_default() += m.states.rows;
                            engines[primary]
                                .feed(job, vec![over_the_wire(&p)], false)
                                .unwrap();
                        }
                    }
                    StageEvent::Output(payloads) => {
                        let s = streamed.entry(job).or_default();
                        for p in payloads {
                            match p {
                                Payload::Tokens(t) => s.tokens.extend_from_slice(&t),
                                Payload::Text(t) => s.text.push_str(&t),
                                other => panic!("a primary sent {:?}", other.kind()),
                            }
                        }
                        // The step that ends the job has released it (and its logits).
                        if let Some(l) = engines[e].last_logits(job) {
                            s.logits.push(l);
                        }
                    }
                    StageEvent::Consumed(n) => {
                        assert_eq!(e, primary);
                        *consumed_rows.entry(job).or_default() += n;
                    }
                    StageEvent::Finished { reason, usage } => {
                        live[e].retain(|j| *j != job);
                        if primary == e {
                            streamed.entry(job).or_default().finished = Some((reason, usage));
                        } else {
                            assert_eq!(reason, FinishReason::Stop);
                            assert_eq!(usage, Usage::default(), "peers count no tokens");
                            let done = peers_done.entry(job).or_default();
                            *done += 1;
                            if *done == sel.len() - 1 {
                                engines[primary].feed(job, Vec::new(), true).unwrap();
                            }
                        }
                    }
                    StageEvent::Failed(err) => panic!("{job} at expert {e}: {err}"),
                    StageEvent::Admitted => panic!("engines never emit Admitted"),
                }
            }
        }
    }
    assert!(peak_bytes > 0);
    // (4) Everything released.
    for (e, engine) in engines.iter().enumerate() {
        assert_eq!(engine.state_bytes(), 0, "expert {e}");
        assert_eq!(engine.active_jobs(), 0, "expert {e}");
    }
    // Every peer sent one chunk per stack; the primaries acknowledged every row.
    assert_eq!(states_sent.len(), (2 + 1) * TINY_MOT_STACKS);
    assert_eq!(consumed_rows, fed_rows);

    let mot = MotModel::load(dir, &Device::Cpu).unwrap();
    let toks_a: Vec<Vec<u32>> = (0..3).map(|e| chat_tokens(dir, e, &msgs_a)).collect();
    let toks_b: Vec<Vec<u32>> = (0..3).map(|e| chat_tokens(dir, e, &msgs_b)).collect();
    let inputs = |toks: &[Vec<u32>], sel: &[usize]| -> Vec<(usize, Vec<u32>)> {
        sel.iter().map(|&e| (e, toks[e].clone())).collect()
    };
    let check = |job: JobId, toks: &[Vec<u32>]| {
        let sel = &routes[&job];
        let primary = sel[0];
        let owned = inputs(toks, sel);
        let ins: Vec<ExpertInput<'_>> = owned
            .iter()
            .map(|(expert, tokens)| ExpertInput {
                expert: *expert,
                tokens,
            })
            .collect();
        let s = &streamed[&job];
        assert_eq!(s.logits.len(), NEW_TOKENS - 1);
        // (1) The prompt logits.
        let full = mot.forward(&ins, primary).unwrap();
        let t = toks[primary].len();
        let want = full.get(t - 1).unwrap().to_vec1::<f32>().unwrap();
        let d = max_diff(&s.logits[0], &want);
        assert!(d <= TOL, "{job}: prompt logits differ by {d}");
        // (2) Greedy tokens, and each decode step's logits.
        let want_tokens = mot.generate_greedy(&ins, primary, NEW_TOKENS).unwrap();
        assert_eq!(s.tokens, want_tokens, "{job}");
        let cont = mot
            .forward_continued(&ins, primary, &s.tokens[..NEW_TOKENS - 1])
            .unwrap();
        for (i, got) in s.logits.iter().enumerate() {
            let want = cont.get(t - 1 + i).unwrap().to_vec1::<f32>().unwrap();
            let d = max_diff(got, &want);
            assert!(d <= TOL, "{job}: step {i} logits differ by {d}");
        }
        // Streamed like an LLM stage: the text is the tokens' text; usage counts the prompt.
        let tokenizer = engines[primary].tokenizer();
        assert_eq!(s.text, tokenizer.decode(&s.tokens, true).unwrap());
        assert_eq!(
            s.finished,
            Some((
                FinishReason::Length,
                Usage {
                    prompt_tokens: t,
                    completion_tokens: NEW_TOKENS
                }
            ))
        );
        want_tokens
    };
    check(a, &toks_a);
    check(b, &toks_b);
    // The peers change the primary's logits (else the checks above would not show that the
    // states were exchanged).
    let ins_a: Vec<ExpertInput<'_>> = (0..3)
        .map(|e| ExpertInput {
            expert: e,
            tokens: &toks_a[e],
        })
        .collect();
    let plain_logits = {
        let one = [ins_a[MEDIUM]];
        mot.forward(&one, MEDIUM).unwrap()
    };
    let mixed_logits = mot.forward(&ins_a, MEDIUM).unwrap();
    let t = toks_a[MEDIUM].len();
    let d = max_diff(
        &plain_logits.get(t - 1).unwrap().to_vec1::<f32>().unwrap(),
        &mixed_logits.get(t - 1).unwrap().to_vec1::<f32>().unwrap(),
    );
    assert!(d > 1e-3, "peers moved the logits by only {d}");

    // (3) K = 1 is the plain expert.
    let tok_c = engines[MEDIUM]
        .tokenizer()
        .encode("plain generation", true)
        .unwrap();
    let plain_c = plain_greedy(mot.expert(MEDIUM).unwrap(), &tok_c, NEW_TOKENS);
    assert_eq!(streamed[&c].tokens, plain_c);
    let one = [ExpertInput {
        expert: MEDIUM,
        tokens: &tok_c,
    }];
    assert_eq!(
        mot.generate_greedy(&one, MEDIUM, NEW_TOKENS).unwrap(),
        plain_c
    );
}

/// A primary job admitted with two peers on its own (the states are made up: this only checks
/// the waiting, the acknowledgements and the errors).
fn fake_states(stack: usize, expert: usize, rows: usize) -> Payload {
    Payload::MotStates(MotStates {
        stack,
        expert,
        states: HiddenStates::new(vec![0.25; rows * 32], 32),
    })
}

fn run_one(engine: &mut dyn StageEngine, job: JobId) -> Vec<StageEvent> {
    let mut events = Vec::new();
    engine
        .step(
            &[StepWork {
                job,
                token_budget: 64,
            }],
            &mut |_, ev| events.push(ev),
        )
        .unwrap();
    events
}

#[test]
fn a_missing_peer_keeps_the_primary_waiting_until_released() {
    let tmp = tempfile::tempdir().unwrap();
    write_mot(tmp.path(), 22).unwrap();
    let mut medium = load_expert(tmp.path(), MEDIUM);
    let sel = [MEDIUM, SMALL, LARGE];
    let req = request(7, Prompt::Completion("wait for me".into()));
    let job = JobId(7);
    let t = medium.admit(job, input(&req, &sel, MEDIUM)).unwrap();
    assert!(
        !medium.awaiting_input(job),
        "its own stack-0 layers can run"
    );
    assert!(run_one(&mut medium, job).is_empty());
    assert!(medium.awaiting_input(job), "at the boundary");

    // One peer's stack-0 states arrive; the other's never do.
    medium
        .feed(job, vec![fake_states(0, SMALL, t)], false)
        .unwrap();
    assert!(!medium.awaiting_input(job), "unacknowledged input");
    let events = run_one(&mut medium, job);
    assert_eq!(events, vec![StageEvent::Consumed(t)]);
    assert!(medium.awaiting_input(job));
    assert_eq!(medium.pending_input(job), t);
    assert!(medium.last_logits(job).is_none());
    assert!(medium.state_bytes() > 0, "the held states count");
    // Stepping it anyway does nothing.
    assert!(run_one(&mut medium, job).is_empty());
    assert!(medium.awaiting_input(job));
    medium.release(job);
    assert_eq!(medium.state_bytes(), 0);
    assert!(!medium.awaiting_input(job));

    // The peers' stream ends without the missing states: the job fails, released.
    let job = JobId(8);
    let t = medium.admit(job, input(&req, &sel, MEDIUM)).unwrap();
    medium
        .feed(job, vec![fake_states(0, SMALL, t)], false)
        .unwrap();
    medium.feed(job, Vec::new(), true).unwrap();
    assert!(!medium.awaiting_input(job));
    let events = run_one(&mut medium, job);
    assert_eq!(events[0], StageEvent::Consumed(t));
    assert!(
        matches!(&events[1], StageEvent::Failed(EngineError::Compute(m)) if m.contains("stack 0")),
        "{events:?}"
    );
    assert_eq!(medium.state_bytes(), 0);
    assert_eq!(medium.active_jobs(), 0);

    // Bad feeds are refused: another kind, the wrong width, an unknown stack, the primary's
    // own expert, the same states twice, and states for a peer job.
    let job = JobId(9);
    medium.admit(job, input(&req, &sel, MEDIUM)).unwrap();
    let bad = [
        Payload::Text("x".into()),
        Payload::MotStates(MotStates {
            stack: 0,
            expert: SMALL,
            states: HiddenStates::new(vec![0.0; 3 * 16], 16),
        }),
        fake_states(TINY_MOT_STACKS, SMALL, 3),
        fake_states(0, MEDIUM, 3),
        fake_states(0, 7, 3),
    ];
    for p in bad {
        let err = medium.feed(job, vec![p.clone()], false).unwrap_err();
        assert!(matches!(err, EngineError::InvalidInput(_)), "{p:?}: {err}");
    }
    let twice = vec![fake_states(0, LARGE, 3), fake_states(0, LARGE, 3)];
    assert!(matches!(
        medium.feed(job, twice, false),
        Err(EngineError::InvalidInput(_))
    ));
    medium.release(job);
    let mut small = load_expert(tmp.path(), SMALL);
    small.admit(job, input(&req, &sel, SMALL)).unwrap();
    assert!(matches!(
        small.feed(job, vec![fake_states(0, LARGE, 3)], false),
        Err(EngineError::InvalidInput(_))
    ));
    small.release(job);
    assert_eq!(small.state_bytes() + medium.state_bytes(), 0);
}

#[test]
fn bad_routes_are_invalid_input() {
    let tmp = tempfile::tempdir().unwrap();
    write_mot(tmp.path(), 23).unwrap();
    let mut small = load_expert(tmp.path(), SMALL);
    let req = request(1, Prompt::Completion("route me".into()));
    let cases = [
        // No route payload at all.
        StageInput {
            request: req.clone(),
            upstream: Vec::new(),
            client_facing: true,
            streaming: false,
        },
        // This stage is not selected.
        input(&req, &[MEDIUM, LARGE], MEDIUM),
        // A decision naming more peers than the checkpoint has.
        StageInput {
            upstream: vec![Payload::Route(Arc::new(RouteDecision {
                selected: vec![
                    stage_id(SMALL),
                    stage_id(MEDIUM),
                    stage_id(LARGE),
                    "mot-extra".into(),
                ],
                scores: Vec::new(),
                reason: "test".into(),
            }))],
            ..input(&req, &[SMALL], SMALL)
        },
        // Speaking is not text generation.
        input(
            &request(1, Prompt::Speak("say this".into())),
            &[SMALL],
            SMALL,
        ),
        // A token id outside the vocabulary.
        input(
            &request(1, Prompt::Tokens(vec![1, 99_999])),
            &[SMALL],
            SMALL,
        ),
    ];
    for (i, case) in cases.into_iter().enumerate() {
        let err = small.admit(JobId(1), case).unwrap_err();
        assert!(
            matches!(err, EngineError::InvalidInput(_)),
            "case {i}: {err}"
        );
    }
    assert_eq!(small.active_jobs(), 0);
    assert_eq!(small.state_bytes(), 0);
}

/// A stage spec for expert `expert` of the MoT folder `dir`, as the deployment parser makes
/// it for a `[stage.mot]` stage.
fn spec(dir: &Path, expert: &str) -> StageSpec {
    let text = "name = \"m\"\n[[stage]]\nid = \"x\"\nkind = \"llm\"\nmodel = \"mot\"\n\
                [outputs]\ntext = \"x\"\n";
    let graph = DeployGraph::from_toml_str(text, &dir.join("deploy.toml"), dir, &[]).unwrap();
    let mut spec = graph.stage("x").unwrap().clone();
    spec.id = format!("mot-{expert}");
    spec.model = dir.join("mot");
    spec.mot = Some(MotSettings {
        expert: expert.into(),
    });
    spec.sampling = greedy();
    spec
}

#[test]
fn the_factory_builds_experts_and_refuses_bad_settings() {
    let tmp = tempfile::tempdir().unwrap();
    write_mot(&tmp.path().join("mot"), 24).unwrap();
    let wiring = StageWiring {
        received: vec![PayloadKind::Route, PayloadKind::MotStates],
        ..Default::default()
    };
    // A K = 1 job through the boxed engine: the plain expert's greedy tokens (stage defaults
    // apply: the request sets no sampling).
    let mut engine = build_engine(&spec(tmp.path(), "large"), &wiring).unwrap();
    let req = Arc::new(JobRequest {
        sampling: SamplingParams::default(),
        ..(*request(5, Prompt::Tokens(vec![3, 1, 4, 1, 5, 9, 2, 6]))).clone()
    });
    engine
        .admit(JobId(5), input(&req, &[LARGE], LARGE))
        .unwrap();
    let mut tokens = Vec::new();
    let mut done = None;
    for _ in 0..=NEW_TOKENS {
        for ev in run_one(&mut engine, JobId(5)) {
            match ev {
                StageEvent::Output(ps) => {
                    for p in ps {
                        if let Payload::Tokens(t) = p {
                            tokens.extend_from_slice(&t);
                        }
                    }
                }
                StageEvent::Finished { reason, .. } => done = Some(reason),
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(done, Some(FinishReason::Length));
    let dir = tmp.path().join("mot/experts/large");
    let model = LlmModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        tokens,
        plain_greedy(&model, &[3, 1, 4, 1, 5, 9, 2, 6], NEW_TOKENS)
    );
    assert_eq!(engine.state_bytes(), 0);

    let err = |s: StageSpec, w: &StageWiring| build_engine(&s, w).err().unwrap().to_string();
    let mut bf16 = spec(tmp.path(), "small");
    bf16.dtype = SpecDType::Bf16;
    let msg = err(bf16, &wiring);
    assert!(msg.contains("f32") && msg.contains("bf16"), "{msg}");
    let msg = err(spec(tmp.path(), "huge"), &wiring);
    assert!(
        msg.contains(MOT_CONFIG_FILE) && msg.contains("\"huge\"") && msg.contains("\"medium\""),
        "{msg}"
    );
    let hidden = StageWiring {
        received: vec![PayloadKind::Hidden],
        ..Default::default()
    };
    let msg = err(spec(tmp.path(), "small"), &hidden);
    assert!(msg.contains("hidden"), "{msg}");
}

/// Peers that finish before their primary is admitted (it queued behind other work): the
/// scheduler joins their states to the primary's input and, with the stream closed, admits it
/// with `streaming` off. The primary takes them from its input and answers as when fed.
#[test]
fn states_that_arrive_before_admission_come_with_the_input() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_mot(dir, 5).unwrap();
    let (mut small, mut medium) = (load_expert(dir, SMALL), load_expert(dir, MEDIUM));
    let msgs = [ChatMessage::text("user", "Queued behind others.")];
    let req = request(9, Prompt::Chat(msgs.to_vec()));
    let job = JobId(9);
    let sel = [MEDIUM, SMALL];
    small.admit(job, input(&req, &sel, SMALL)).unwrap();
    let mut states = Vec::new();
    for _ in 0..TINY_MOT_STACKS {
        for ev in run_one(&mut small, job) {
            if let StageEvent::Output(ps) = ev {
                states.extend(ps.iter().map(over_the_wire));
            }
        }
    }
    assert_eq!(states.len(), TINY_MOT_STACKS);
    let mut late = input(&req, &sel, MEDIUM);
    late.upstream.extend(states);
    late.streaming = false;
    medium.admit(job, late).unwrap();
    assert!(!medium.awaiting_input(job));
    let mut tokens = Vec::new();
    for _ in 0..=NEW_TOKENS {
        for ev in run_one(&mut medium, job) {
            match ev {
                StageEvent::Output(ps) => {
                    for p in ps {
                        if let Payload::Tokens(t) = p {
                            tokens.extend_from_slice(&t);
                        }
                    }
                }
                StageEvent::Failed(e) => panic!("{e}"),
                _ => {}
            }
        }
    }
    let mot = MotModel::load(dir, &Device::Cpu).unwrap();
    let (ts, tm) = (
        chat_tokens(dir, SMALL, &msgs),
        chat_tokens(dir, MEDIUM, &msgs),
    );
    let ins = [
        ExpertInput {
            expert: MEDIUM,
            tokens: &tm,
        },
        ExpertInput {
            expert: SMALL,
            tokens: &ts,
        },
    ];
    assert_eq!(
        tokens,
        mot.generate_greedy(&ins, MEDIUM, NEW_TOKENS).unwrap()
    );
    assert_eq!(medium.state_bytes(), 0);
}
