//! The talker stage engine on a tiny random-weight checkpoint, driven step by step as the stage
//! scheduler drives it: hidden-state conditioning gives the same codes however the thinker's
//! rows arrive, batching and preemption do not change a job's codes, and every frame is whole,
//! valid and in canonical order (checked on every output by the driver).

mod talker_support;

use omnistage_engines::llm::engine::LlmEngineSettings;
use omnistage_engines::llm::talker::TalkerEngine;
use omnistage_stages::{FinishReason, JobId, Prompt, SamplingParams, StageEngine, StageInput};
use talker_support::*;

#[test]
fn streamed_rows_give_the_codes_of_rows_given_at_once() {
    let (_dir, mut e) = talker(greedy(7 * FRAMES));
    let data = rows(1, 20);
    let whole = solo(
        &mut e,
        input(vec![], false, 0),
        Some(Arrival {
            data: data.clone(),
            stream: None,
        }),
    );
    assert_eq!(whole.finish, Some(FinishReason::Length));
    assert_eq!(whole.codes.len(), 7 * FRAMES);
    assert_eq!(whole.consumed, 0, "a non-streamed input reports no credit");
    for chunk in [1, 2, 5] {
        let mut sizes = vec![chunk; (20 - chunk) / chunk];
        let rest = 20 - chunk - sizes.iter().sum::<usize>();
        if rest > 0 {
            sizes.push(rest);
        }
        let streamed = solo(
            &mut e,
            input(vec![], true, 0),
            Some(Arrival {
                data: data.clone(),
                stream: Some((chunk, sizes)),
            }),
        );
        assert_eq!(streamed.codes, whole.codes, "chunks of {chunk}");
        assert_eq!(streamed.raw, whole.raw, "chunks of {chunk}");
        assert_eq!(
            streamed.consumed, 20,
            "chunks of {chunk}: every row credited once"
        );
        assert!(
            streamed.starved_steps > 0,
            "chunks of {chunk}: never starved"
        );
    }
}

#[test]
fn seeded_sampling_is_the_same_streamed_or_not() {
    let sampled = SamplingParams {
        temperature: Some(1.0),
        ..greedy(7 * 4)
    };
    let (_dir, mut e) = talker(sampled);
    let data = rows(2, 10);
    let go = |e: &mut TalkerEngine, seed, stream: Option<(usize, Vec<usize>)>| {
        let arrival = Arrival {
            data: data.clone(),
            stream: stream.clone(),
        };
        solo(e, input(vec![], stream.is_some(), seed), Some(arrival)).codes
    };
    let a = go(&mut e, 11, None);
    assert_eq!(go(&mut e, 11, Some((3, vec![3, 4]))), a);
    assert_ne!(go(&mut e, 12, None), a, "another seed, other codes");
}

#[test]
fn batched_jobs_get_their_solo_codes() {
    let (_dir, mut e) = talker(greedy(7 * FRAMES));
    let (a, b) = (rows(3, 12), rows(4, 30));
    let text_input = || StageInput {
        request: request(
            Prompt::Completion("Hello there, friend".into()),
            Some("leo"),
            0,
        ),
        upstream: vec![],
        client_facing: false,
        streaming: false,
    };
    let arr = |d: &Vec<f32>, stream| Arrival {
        data: d.clone(),
        stream,
    };
    let sa = solo(&mut e, input(vec![], false, 0), Some(arr(&a, None)));
    let sb = solo(&mut e, input(vec![], false, 0), Some(arr(&b, None)));
    let sc = solo(&mut e, text_input(), None);
    let batched = run(
        &mut e,
        vec![
            (JobId(1), input(vec![], false, 0), Some(arr(&a, None))),
            (
                JobId(2),
                input(vec![], true, 0),
                Some(arr(&b, Some((2, vec![2; 14])))),
            ),
            (JobId(3), text_input(), None),
        ],
    );
    assert_eq!(batched[&JobId(1)].codes, sa.codes);
    assert_eq!(batched[&JobId(2)].codes, sb.codes);
    assert_eq!(batched[&JobId(3)].codes, sc.codes);
    assert_ne!(sa.codes, sc.codes);
}

#[test]
fn a_small_pool_preempts_without_changing_codes() {
    // Blocks of 4 tokens (so conditioned prompts share their unconditioned prefix) in a pool
    // of 16 blocks (64 tokens): three jobs of ~50 tokens cannot all fit, so younger ones are
    // preempted and recomputed, thinker rows included.
    let pool = |blocks: u64| LlmEngineSettings {
        sampling: greedy(7 * FRAMES),
        kv_block_size: 4,
        kv_cache_bytes: Some(blocks * 2 * 2 * 4 * 2 * 16 * 4),
        ..Default::default()
    };
    let data: Vec<Vec<f32>> = (0..3).map(|i| rows(20 + i, 9 + 7 * i as usize)).collect();
    let arrival = |i: usize, stream: bool| Arrival {
        data: data[i].clone(),
        stream: stream.then(|| (1, vec![1; data[i].len() / DIM - 1])),
    };
    let (_dir, mut roomy) = talker_full(pool(256), |_| {});
    let solos: Vec<Vec<u32>> = (0..3)
        .map(|i| solo(&mut roomy, input(vec![], false, 0), Some(arrival(i, false))).codes)
        .collect();
    let (_dir, mut tight) = talker_full(pool(16), |_| {});
    let jobs = (0..3)
        .map(|i| {
            let stream = i == 1;
            (
                JobId(i as u64),
                input(vec![], stream, 0),
                Some(arrival(i, stream)),
            )
        })
        .collect();
    let out = run(&mut tight, jobs);
    for (i, codes) in solos.iter().enumerate() {
        assert_eq!(&out[&JobId(i as u64)].codes, codes, "job {i}");
    }
    let stats = tight.stats();
    assert!(stats.preemptions_total > 0, "{stats:?}");
    assert!(stats.prefix_hit_tokens_total > 0, "{stats:?}");
}

#[test]
fn the_projection_steers_the_codes() {
    let (_dir, mut e) = talker(greedy(7 * FRAMES));
    let go = |e: &mut TalkerEngine, data: Vec<f32>| {
        let arrival = Arrival { data, stream: None };
        solo(e, input(vec![], false, 0), Some(arrival)).codes
    };
    let a = go(&mut e, rows(5, 8));
    let b = go(&mut e, rows(6, 8));
    let none = go(&mut e, Vec::new());
    assert_ne!(a, b, "different thinker rows, different codes");
    assert_ne!(a, none);
    assert!(a.iter().chain(&b).all(|c| *c < 64));
}
