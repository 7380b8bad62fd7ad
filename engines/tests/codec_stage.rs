//! The codec stage engine over real (tiny) codecs: frames arriving whole or chunk by chunk give
//! the one-shot decode sample for sample; several jobs share steps; consumed frames are credited
//! before a job reports that it waits; bad frames are refused as invalid input.

use candle_core::Device;
use omnistage_engines::audio::codec::Codec;
use omnistage_engines::audio::mimi::{MimiCodec, MimiSettings};
use omnistage_engines::audio::snac::SnacCodec;
use omnistage_engines::audio::stage::CodecEngine;
use omnistage_engines::tiny::{write_tiny_mimi, write_tiny_snac, TinyMimiSpec, TinySnacSpec};
use omnistage_stages::{
    AudioParams, CodecFrames, EngineError, JobId, JobRequest, Modality, Payload, Prompt,
    SamplingParams, StageEngine, StageEvent, StageInput, StepWork,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn input(first: Vec<Payload>, streaming: bool, seed: u64) -> StageInput {
    StageInput {
        request: Arc::new(JobRequest {
            id: JobId(0),
            prompt: Prompt::Completion(String::new()),
            sampling: SamplingParams::default(),
            outputs: vec![Modality::Audio],
            deadline: Instant::now() + Duration::from_secs(60),
            image: None,
            media: Vec::new(),
            audio: Some(AudioParams {
                voice: "default".into(),
                seed,
            }),
            route: Default::default(),
        }),
        upstream: first,
        client_facing: true,
        streaming,
    }
}

/// Deterministic codes for `frames` frames of `codec`.
fn codes<C: Codec>(codec: &C, frames: usize, salt: u32) -> Vec<u32> {
    let info = codec.info();
    (0..frames * info.codes_per_frame)
        .map(|i| (i as u32 * 7 + salt * 13 + 3) % info.codebook_size as u32)
        .collect()
}

fn frames_payload(codes: &[u32], width: usize) -> Payload {
    Payload::Codes(CodecFrames::new(codes.to_vec(), width).unwrap())
}

#[derive(Default)]
struct Seen {
    samples: Vec<f32>,
    consumed: usize,
    finished: bool,
}

fn step_all<E: StageEngine>(engine: &mut E, jobs: &[JobId], seen: &mut HashMap<JobId, Seen>) {
    let work: Vec<StepWork> = jobs
        .iter()
        .filter(|j| !seen.get(j).is_some_and(|s| s.finished))
        .filter(|j| !engine.awaiting_input(**j))
        .map(|&job| StepWork {
            job,
            token_budget: 1,
        })
        .collect();
    engine
        .step(&work, &mut |job, ev| {
            let s = seen.entry(job).or_default();
            match ev {
                StageEvent::Output(ps) => {
                    for p in ps {
                        match p {
                            Payload::Pcm(pcm) => s.samples.extend_from_slice(&pcm.samples),
                            other => panic!("a codec emitted {:?}", other.kind()),
                        }
                    }
                }
                StageEvent::Consumed(n) => s.consumed += n,
                StageEvent::Finished { .. } => s.finished = true,
                StageEvent::Failed(e) => panic!("{job}: {e}"),
                StageEvent::Admitted => {}
            }
        })
        .unwrap();
}

/// Three jobs: one whole, two streamed in different chunk sizes; each must equal its one-shot
/// decode, and the streamed ones must report every frame consumed before they wait.
fn streamed_equals_one_shot<C: Codec>(codec: C) {
    let info = codec.info().clone();
    let width = info.codes_per_frame;
    let frames = 9;
    let all: Vec<Vec<u32>> = (0..3).map(|j| codes(&codec, frames, j)).collect();
    let reference: Vec<Vec<f32>> = all
        .iter()
        .enumerate()
        .map(|(j, c)| codec.decode(c, 100 + j as u64).unwrap())
        .collect();
    let mut engine = CodecEngine::new(codec);
    let ids = [JobId(1), JobId(2), JobId(3)];
    let chunk = [frames, 1, 4];
    let mut sent = [0usize; 3];
    for j in 0..3 {
        let first = chunk[j].min(frames);
        let streaming = first < frames;
        engine
            .admit(
                ids[j],
                input(
                    vec![frames_payload(&all[j][..first * width], width)],
                    streaming,
                    100 + j as u64,
                ),
            )
            .unwrap();
        sent[j] = first;
    }
    let mut seen: HashMap<JobId, Seen> = HashMap::new();
    for _ in 0..200 {
        step_all(&mut engine, &ids, &mut seen);
        for j in 0..3 {
            if sent[j] < frames && engine.awaiting_input(ids[j]) {
                let got = seen.get(&ids[j]).map_or(0, |s| s.consumed);
                assert_eq!(got, sent[j], "waiting before crediting its frames");
                let next = (sent[j] + chunk[j]).min(frames);
                let more = frames_payload(&all[j][sent[j] * width..next * width], width);
                engine.feed(ids[j], vec![more], next == frames).unwrap();
                sent[j] = next;
            }
        }
        if ids
            .iter()
            .all(|id| seen.get(id).is_some_and(|s| s.finished))
        {
            break;
        }
    }
    for j in 0..3 {
        let s = &seen[&ids[j]];
        assert!(s.finished, "job {j} never finished");
        assert_eq!(s.consumed, frames);
        assert_eq!(s.samples.len(), frames * info.samples_per_frame);
        let diff = s
            .samples
            .iter()
            .zip(&reference[j])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-4, "job {j}: streamed differs by {diff}");
    }
    assert_eq!(
        engine.stats().audio_samples_total,
        (3 * frames * info.samples_per_frame) as u64
    );
}

#[test]
fn mimi_stage_streams_exactly() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_mimi(dir.path(), &TinyMimiSpec::tiny(), 5).unwrap();
    let codec = MimiCodec::load(dir.path(), &MimiSettings::default(), &Device::Cpu).unwrap();
    streamed_equals_one_shot(codec);
}

#[test]
fn snac_stage_streams_exactly() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_snac(dir.path(), &TinySnacSpec::tiny(), 5).unwrap();
    let codec = SnacCodec::load(dir.path(), candle_core::DType::F32, &Device::Cpu).unwrap();
    streamed_equals_one_shot(codec);
}

#[test]
fn bad_frames_are_invalid_input_and_empty_streams_finish() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_mimi(dir.path(), &TinyMimiSpec::tiny(), 5).unwrap();
    let codec = MimiCodec::load(dir.path(), &MimiSettings::default(), &Device::Cpu).unwrap();
    let width = codec.info().codes_per_frame;
    let size = codec.info().codebook_size as u32;
    let mut engine = CodecEngine::new(codec);
    let wrong_width = frames_payload(&vec![0; width + 1], width + 1);
    let err = engine
        .admit(JobId(1), input(vec![wrong_width], false, 0))
        .unwrap_err();
    assert!(
        matches!(err, EngineError::InvalidInput(ref m) if m.contains("frames of")),
        "{err}"
    );
    let out_of_book = frames_payload(&vec![size; width], width);
    assert!(matches!(
        engine.admit(JobId(2), input(vec![out_of_book], false, 0)),
        Err(EngineError::InvalidInput(_))
    ));
    let text = Payload::Text("hello".into());
    assert!(matches!(
        engine.admit(JobId(3), input(vec![text], false, 0)),
        Err(EngineError::InvalidInput(_))
    ));
    // A talker that ended before its first frame: nothing to decode, the job just finishes.
    let empty = Payload::Codes(CodecFrames {
        codes: Vec::new().into(),
        frames: 0,
        codes_per_frame: 0,
    });
    engine
        .admit(JobId(4), input(vec![empty], false, 0))
        .unwrap();
    assert!(!engine.awaiting_input(JobId(4)));
    let mut seen = HashMap::new();
    step_all(&mut engine, &[JobId(4)], &mut seen);
    assert!(seen[&JobId(4)].finished);
    assert!(seen[&JobId(4)].samples.is_empty());
}
