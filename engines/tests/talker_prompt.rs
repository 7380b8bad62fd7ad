//! The talker's text prompts (format, voices, refusals), its end tokens, and a thinker's hidden
//! rows — one per generated token — driving it.

mod talker_support;

use candle_core::{DType, Device};
use omnistage_engines::llm::engine::{LlmEngine, LlmEngineSettings};
use omnistage_engines::llm::model::SeqChunk;
use omnistage_engines::tiny;
use omnistage_stages::{
    ChatMessage, EngineError, FinishReason, HiddenStates, JobId, JobRequest, Payload, Prompt,
    SamplingParams, StageEngine, StageEvent, StageInput, StepWork,
};
use std::sync::Arc;
use talker_support::*;

#[test]
fn text_prompts_follow_the_format_and_voices() {
    let (_dir, mut e) = talker(greedy(7));
    let s = e.talker_settings().clone();
    let expect = |text: &str| {
        let mut ids = s.prompt_prefix_ids.clone();
        ids.extend(e.tokenizer().encode(text, true).unwrap());
        ids.extend_from_slice(&s.prompt_suffix_ids);
        ids
    };
    let with = |prompt: Prompt, voice: Option<&str>, upstream: Vec<Payload>| StageInput {
        request: request(prompt, voice, 0),
        upstream,
        client_facing: false,
        streaming: false,
    };
    let completion = with(
        Prompt::Completion("hello world".into()),
        Some("leo"),
        vec![],
    );
    assert_eq!(
        e.prompt_ids(&completion).unwrap(),
        expect("leo: hello world")
    );
    // No audio settings: the default voice ("tara" in the tiny settings).
    let chat = with(
        Prompt::Chat(vec![
            ChatMessage {
                role: "user".into(),
                content: "first".into(),
            },
            ChatMessage {
                role: "assistant".into(),
                content: "reply".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "say this".into(),
            },
        ]),
        None,
        vec![],
    );
    assert_eq!(e.prompt_ids(&chat).unwrap(), expect("tara: say this"));
    // Upstream text wins over the request's prompt; hidden states empty `{text}`.
    let text = with(
        Prompt::Completion("ignored".into()),
        None,
        vec![Payload::Text("from the thinker".into())],
    );
    assert_eq!(
        e.prompt_ids(&text).unwrap(),
        expect("tara: from the thinker")
    );
    let omni = with(
        Prompt::Completion("ignored".into()),
        None,
        vec![hidden(&rows(7, 2))],
    );
    assert_eq!(e.prompt_ids(&omni).unwrap(), expect("tara: "));
    // The prompt runs and speaks.
    let out = solo(&mut e, completion, None);
    assert_eq!(out.codes.len(), 7);
    // Refusals.
    let unknown = with(Prompt::Completion("x".into()), Some("bob"), vec![]);
    match e.admit(JobId(5), unknown) {
        Err(EngineError::InvalidInput(m)) => {
            assert!(m.contains("bob") && m.contains("default, leo"), "{m}")
        }
        other => panic!("unknown voice: {other:?}"),
    }
    let tokens = with(Prompt::Tokens(vec![1, 2]), None, vec![]);
    assert!(matches!(
        e.admit(JobId(6), tokens),
        Err(EngineError::InvalidInput(_))
    ));
    let wide = with(
        Prompt::Completion("x".into()),
        None,
        vec![Payload::Hidden(HiddenStates::new(vec![0.0; 10], 5))],
    );
    assert!(matches!(
        e.admit(JobId(7), wide),
        Err(EngineError::InvalidInput(_))
    ));
    // A text-prompted job takes no streamed rows; other kinds are refused in a feed.
    e.admit(JobId(8), with(Prompt::Completion("x".into()), None, vec![]))
        .unwrap();
    assert!(e.feed(JobId(8), vec![hidden(&rows(1, 1))], false).is_err());
    e.admit(JobId(9), input(vec![hidden(&rows(1, 1))], true, 0))
        .unwrap();
    assert!(e
        .feed(JobId(9), vec![Payload::Text("no".into())], false)
        .is_err());
    e.release(JobId(8));
    e.release(JobId(9));
    assert_eq!(e.state_bytes(), 0);
    assert_eq!(e.active_sequences(), 0);
}

#[test]
fn end_tokens_stop_at_frame_boundaries() {
    // Every text token counts as an end token here, so a greedy run soon picks one at some
    // frame boundary; it never cuts a frame.
    let (_dir, mut e) = talker_with(
        SamplingParams {
            ignore_eos: false,
            ..greedy(7 * 3 + 4)
        },
        |s| s.end_token_ids = (0..=tiny::TINY_TALKER_AUDIO_END).collect(),
    );
    let mut stops = 0;
    for seed in 0..6 {
        let arrival = Arrival {
            data: rows(seed, 5),
            stream: None,
        };
        let o = solo(&mut e, input(vec![], false, 0), Some(arrival));
        match o.finish {
            Some(FinishReason::Stop) => {
                stops += 1;
                assert_eq!(o.completion_tokens % 7, 0);
                assert_eq!(o.raw.len(), o.completion_tokens);
            }
            // 25 tokens: three whole frames, the partial fourth dropped.
            Some(FinishReason::Length) => {
                assert_eq!((o.raw.len(), o.completion_tokens), (21, 25))
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(stops > 0, "no run ended on an end token");
    // With `ignore_eos` the same runs go to their limit.
    let (_dir, mut e) = talker_with(greedy(7 * 3 + 4), |s| {
        s.end_token_ids = (0..=tiny::TINY_TALKER_AUDIO_END).collect()
    });
    let arrival = Arrival {
        data: rows(0, 5),
        stream: None,
    };
    let o = solo(&mut e, input(vec![], false, 0), Some(arrival));
    assert_eq!(o.finish, Some(FinishReason::Length));
}

/// Runs the thinker alone and collects, per output event, its tokens and hidden rows.
fn thinker_rows(dir: &std::path::Path, prompt: &str, n: usize) -> (Vec<u32>, Vec<f32>) {
    let settings = LlmEngineSettings {
        emit_hidden: true,
        ..Default::default()
    };
    let mut e = LlmEngine::load(dir, DType::F32, &Device::Cpu, settings).unwrap();
    let inp = StageInput {
        request: Arc::new(JobRequest {
            sampling: greedy(n),
            ..(*request(Prompt::Completion(prompt.into()), None, 0)).clone()
        }),
        upstream: vec![],
        client_facing: true,
        streaming: false,
    };
    e.admit(JobId(1), inp).unwrap();
    let (mut tokens, mut data) = (Vec::new(), Vec::new());
    let mut done = false;
    while !done {
        e.step(
            &[StepWork {
                job: JobId(1),
                token_budget: 3,
            }],
            &mut |_, ev| match ev {
                StageEvent::Output(ps) => {
                    let (mut t, mut h) = (0, 0);
                    for p in ps {
                        match p {
                            Payload::Tokens(ids) => {
                                t += ids.len();
                                tokens.extend_from_slice(&ids);
                            }
                            Payload::Hidden(rows) => {
                                assert_eq!(rows.dim, 64);
                                h += rows.rows;
                                data.extend_from_slice(&rows.data);
                            }
                            _ => {}
                        }
                    }
                    assert_eq!(t, h, "one hidden row per token, in the token's event");
                }
                StageEvent::Finished { .. } => done = true,
                StageEvent::Failed(err) => panic!("{err}"),
                _ => {}
            },
        )
        .unwrap();
    }
    // The first row is the last prompt position's final hidden state, the second the first
    // generated token's: they match a plain forward.
    let model = e.model();
    let prompt_ids = e.tokenizer().encode(prompt, true).unwrap();
    let mut cache = model.new_cache();
    let mut forward = |ids: &[u32]| {
        let out = model
            .forward(&mut [SeqChunk {
                tokens: ids,
                cache: &mut cache,
                want_hidden: true,
            }])
            .unwrap();
        let h = out.hidden[0].as_ref().unwrap();
        let last = h.dim(0).unwrap() - 1;
        h.get(last).unwrap().to_vec1::<f32>().unwrap()
    };
    for (t, want) in [forward(&prompt_ids), forward(&tokens[..1])]
        .iter()
        .enumerate()
    {
        let got = &data[t * DIM..(t + 1) * DIM];
        let diff = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "row {t} differs by {diff}");
    }
    (tokens, data)
}

#[test]
fn thinker_rows_drive_the_talker() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = tiny::make_tiny(dir.path(), 3).unwrap();
    let thinker = manifest.checkpoint("thinker").unwrap().dir.clone();
    let (tokens, data) = thinker_rows(&thinker, "Once upon a time", 9);
    assert_eq!(tokens.len(), 9);
    assert_eq!(data.len(), 9 * DIM, "exactly one row per generated token");
    let (_tdir, mut e) = talker(greedy(7 * 3));
    let whole = solo(
        &mut e,
        input(vec![], false, 0),
        Some(Arrival {
            data: data.clone(),
            stream: None,
        }),
    );
    let streamed = solo(
        &mut e,
        input(vec![], true, 0),
        Some(Arrival {
            data,
            stream: Some((1, vec![1; 8])),
        }),
    );
    assert_eq!(whole.codes, streamed.codes);
    assert_eq!(streamed.consumed, 9);
}
