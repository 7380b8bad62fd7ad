//! Round trips of every control message and decoding of hostile bytes.

use super::*;
use crate::wire;
use omnistage_stages::payload::{CodecFrames, HiddenStates, PcmAudio, RgbImages};
use omnistage_stages::{
    AudioParams, ChatMessage, ContentPart, EngineError, FinishReason, ImageParams, JobRequest,
    MediaData, MediaDigest, MediaInput, MessageContent, Modality, Prompt, RouteRequest,
    SamplingParams, Usage,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counts the bytes each thread asks the allocator for, so a test can check that decoding a
/// small hostile buffer allocates little whatever counts it declares.
struct Counting;

thread_local! {
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

fn count_alloc(size: usize) {
    let _ = ALLOCATED.try_with(|c| c.set(c.get().saturating_add(size)));
}

// SAFETY: forwards every call to `System` unchanged; the counter is a const-initialized
// thread-local without a destructor, so touching it never allocates or re-enters.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_alloc(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_alloc(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_alloc(new_size);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes this thread allocated while running `f`.
fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATED.with(Cell::get);
    let out = f();
    (out, ALLOCATED.with(Cell::get) - before)
}

fn f(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| seed + i as f32 * 0.25).collect()
}

fn sampling() -> SamplingParams {
    SamplingParams {
        temperature: Some(0.7),
        top_p: Some(0.95),
        top_k: Some(40),
        seed: Some(u64::MAX - 3),
        max_tokens: Some(512),
        repetition_penalty: Some(1.1),
        stop: vec!["</s>".into(), "\n\nUser:".into(), "".into()],
        stop_token_ids: vec![2, 151_645, u32::MAX],
        ignore_eos: true,
    }
}

fn request(id: u64, prompt: Prompt) -> JobRequest {
    JobRequest {
        id: JobId(id),
        prompt,
        sampling: SamplingParams::default(),
        outputs: vec![Modality::Text],
        deadline: Instant::now() + Duration::from_secs(30),
        image: None,
        audio: None,
        media: Vec::new(),
        route: Default::default(),
    }
}

/// A chat request with text, image and audio parts, both media kinds, every sampling field and
/// both output parameter sets.
fn chat_request() -> JobRequest {
    let image = MediaInput::image((0..4 * 3 * 3).map(|i| i as u8).collect(), 4, 3).unwrap();
    let audio = MediaInput::audio(f(100, -0.5), 16_000).unwrap();
    // A digest travels as sent, even one that does not match the content.
    let odd = MediaInput {
        digest: MediaDigest([7; 32]),
        ..MediaInput::audio(vec![0.25; 3], 24_000).unwrap()
    };
    JobRequest {
        sampling: sampling(),
        outputs: vec![Modality::Text, Modality::Image, Modality::Audio],
        image: Some(ImageParams {
            width: 1024,
            height: 768,
            n: 2,
            steps: 28,
            guidance_scale: 4.5,
            negative_prompt: Some("blurry, low quality ✗".into()),
            seed: 42,
            step_cache: true,
        }),
        audio: Some(AudioParams {
            voice: "tara".into(),
            seed: 7,
        }),
        media: vec![image, audio, odd],
        route: RouteRequest {
            model: Some("tiny-mot".into()),
            k: Some(2),
        },
        ..request(
            17,
            Prompt::Chat(vec![
                ChatMessage::text("system", "You are a helpful assistant."),
                ChatMessage {
                    role: "user".into(),
                    content: MessageContent::Parts(vec![
                        ContentPart::Text {
                            text: "What is in this picture and this clip? ".into(),
                        },
                        ContentPart::Image,
                        ContentPart::Audio,
                        ContentPart::Text {
                            text: "Also this: ".into(),
                        },
                        ContentPart::Audio,
                    ]),
                },
                ChatMessage::text("assistant", ""),
            ]),
        )
    }
}

fn outputs() -> Vec<Payload> {
    vec![
        Payload::Text("héllo ✓".into()),
        Payload::Tokens(vec![1, 2, 3].into()),
        Payload::Hidden(HiddenStates::new(f(32, 1.0), 8)),
        Payload::Codes(CodecFrames::new((0..14).collect(), 7).unwrap()),
        Payload::Pcm(PcmAudio {
            samples: f(10, -1.0).into(),
            sample_rate: 24_000,
        }),
        Payload::Image(RgbImages {
            pixels: (0..2 * 2 * 3).map(|i| i as u8).collect(),
            n: 1,
            height: 2,
            width: 2,
        }),
    ]
}

fn to_worker_samples() -> Vec<ToWorker> {
    let input = |request, upstream, client_facing, streaming| StageInput {
        request: Arc::new(request),
        upstream,
        client_facing,
        streaming,
    };
    vec![
        ToWorker::Submit {
            job: JobId(17),
            input: input(chat_request(), Vec::new(), true, false),
        },
        ToWorker::Submit {
            job: JobId(18),
            input: input(
                JobRequest {
                    outputs: vec![Modality::Audio],
                    audio: Some(AudioParams {
                        voice: "default".into(),
                        seed: 0,
                    }),
                    ..request(18, Prompt::Speak("Read this aloud, please.".into()))
                },
                vec![Payload::Hidden(HiddenStates::new(f(16, 0.5), 4))],
                false,
                true,
            ),
        },
        ToWorker::Submit {
            job: JobId(19),
            input: input(
                JobRequest {
                    sampling: sampling(),
                    ..request(19, Prompt::Tokens(vec![0, 15, 151_643, u32::MAX]))
                },
                outputs(),
                true,
                false,
            ),
        },
        ToWorker::Submit {
            job: JobId(u64::MAX),
            input: input(
                request(u64::MAX, Prompt::Completion("Once upon a time".into())),
                Vec::new(),
                false,
                false,
            ),
        },
        ToWorker::Feed {
            job: JobId(18),
            payloads: outputs(),
            last: false,
        },
        ToWorker::Feed {
            job: JobId(18),
            payloads: Vec::new(),
            last: true,
        },
        ToWorker::Cancel { job: JobId(3) },
        ToWorker::Hold {
            job: JobId(4),
            held: true,
        },
        ToWorker::Hold {
            job: JobId(4),
            held: false,
        },
        ToWorker::StatsRequest,
        ToWorker::Shutdown,
    ]
}

fn engine_stats() -> EngineStats {
    EngineStats {
        state_bytes: 1 << 30,
        kv_blocks_used: 2,
        kv_blocks_total: 3,
        kv_blocks_cached: 4,
        preemptions_total: 5,
        prefix_query_tokens_total: 6,
        prefix_hit_tokens_total: 7,
        denoise_image_steps_total: 8,
        denoise_cached_image_steps_total: 9,
        denoise_forwards_total: 10,
        denoise_rows_total: 11,
        images_total: 12,
        audio_samples_total: 13,
        media_encoded_total: 14,
        encoder_cache_queries_total: 15,
        encoder_cache_hits_total: u64::MAX,
        mot_boundaries_total: 16,
        mot_boundary_wait_us_total: 17,
    }
}

fn from_worker_samples() -> Vec<FromWorker> {
    let event = |job, event| FromWorker::Event {
        job: JobId(job),
        event,
    };
    vec![
        event(1, StageEvent::Admitted),
        event(2, StageEvent::Output(outputs())),
        event(2, StageEvent::Output(Vec::new())),
        event(3, StageEvent::Consumed(4096)),
        event(
            4,
            StageEvent::Finished {
                reason: FinishReason::Stop,
                usage: Usage {
                    prompt_tokens: 19,
                    completion_tokens: 8,
                },
            },
        ),
        event(
            4,
            StageEvent::Finished {
                reason: FinishReason::Length,
                usage: Usage::default(),
            },
        ),
        event(
            4,
            StageEvent::Finished {
                reason: FinishReason::Complete,
                usage: Usage {
                    prompt_tokens: 1,
                    completion_tokens: 0,
                },
            },
        ),
        event(
            5,
            StageEvent::Failed(EngineError::InvalidInput(
                "prompt too long: 9000 > 8192".into(),
            )),
        ),
        event(
            6,
            StageEvent::Failed(EngineError::Compute("CUDA OOM ✗".into())),
        ),
        FromWorker::Stats(WorkerStats {
            waiting: 3,
            running: 8,
            state_bytes: 1 << 20,
            engine: engine_stats(),
            steps_total: 123_456,
        }),
        FromWorker::Ready {
            stage: "thinker".into(),
            replica: 2,
        },
        FromWorker::Refused {
            job: JobId(9),
            reason: RefuseReason::QueueFull { capacity: 256 },
        },
        FromWorker::Refused {
            job: JobId(10),
            reason: RefuseReason::Stopped,
        },
    ]
}

fn assert_request_eq(a: &JobRequest, b: &JobRequest) {
    assert_eq!(a.id, b.id);
    assert_eq!(a.prompt, b.prompt);
    assert_eq!(a.sampling, b.sampling);
    assert_eq!(a.outputs, b.outputs);
    assert_eq!(a.image, b.image);
    assert_eq!(a.audio, b.audio);
    assert_eq!(a.media, b.media);
    assert_eq!(a.route, b.route);
    // Rebuilt from the milliseconds left: never later, and within a generous second.
    let (early, late) = (a.deadline.min(b.deadline), a.deadline.max(b.deadline));
    assert!(late - early < Duration::from_secs(1), "{a:?} vs {b:?}");
}

fn assert_to_worker_eq(a: &ToWorker, b: &ToWorker) {
    match (a, b) {
        (ToWorker::Submit { job: ja, input: ia }, ToWorker::Submit { job: jb, input: ib }) => {
            assert_eq!(ja, jb);
            assert_request_eq(&ia.request, &ib.request);
            assert_eq!(ia.upstream, ib.upstream);
            assert_eq!(ia.client_facing, ib.client_facing);
            assert_eq!(ia.streaming, ib.streaming);
        }
        (
            ToWorker::Feed {
                job: ja,
                payloads: pa,
                last: la,
            },
            ToWorker::Feed {
                job: jb,
                payloads: pb,
                last: lb,
            },
        ) => assert_eq!((ja, pa, la), (jb, pb, lb)),
        (ToWorker::Cancel { job: ja }, ToWorker::Cancel { job: jb }) => assert_eq!(ja, jb),
        (ToWorker::Hold { job: ja, held: ha }, ToWorker::Hold { job: jb, held: hb }) => {
            assert_eq!((ja, ha), (jb, hb))
        }
        (ToWorker::StatsRequest, ToWorker::StatsRequest)
        | (ToWorker::Shutdown, ToWorker::Shutdown) => {}
        _ => panic!("variants differ: {a:?} vs {b:?}"),
    }
}

fn encoded_samples() -> Vec<(Vec<u8>, bool)> {
    let to = to_worker_samples()
        .into_iter()
        .map(|m| (encode_to_worker(&m).unwrap(), true));
    let from = from_worker_samples()
        .into_iter()
        .map(|m| (encode_from_worker(&m).unwrap(), false));
    to.chain(from).collect()
}

/// Decodes in the given direction, keeping only whether it worked (must never panic).
fn decodes(buf: &[u8], to_worker: bool) -> bool {
    if to_worker {
        decode_to_worker(buf).is_ok()
    } else {
        decode_from_worker(buf).is_ok()
    }
}

#[test]
fn every_to_worker_message_round_trips() {
    for msg in to_worker_samples() {
        let bytes = encode_to_worker(&msg).unwrap();
        assert_eq!(&bytes[..4], b"OSRM");
        let back = decode_to_worker(&bytes).unwrap();
        assert_to_worker_eq(&msg, &back);
        // The other direction refuses it.
        assert!(matches!(
            decode_from_worker(&bytes),
            Err(RemoteError::Direction {
                expected: 2,
                found: 1
            })
        ));
    }
}

#[test]
fn every_from_worker_message_round_trips() {
    for msg in from_worker_samples() {
        let bytes = encode_from_worker(&msg).unwrap();
        assert_eq!(decode_from_worker(&bytes).unwrap(), msg);
        assert!(matches!(
            decode_to_worker(&bytes),
            Err(RemoteError::Direction {
                expected: 1,
                found: 2
            })
        ));
    }
}

#[test]
fn deadlines_travel_as_time_left() {
    let mut past = request(1, Prompt::Completion("x".into()));
    past.deadline = Instant::now() - Duration::from_secs(5);
    let msg = ToWorker::Submit {
        job: JobId(1),
        input: StageInput {
            request: Arc::new(past),
            upstream: Vec::new(),
            client_facing: true,
            streaming: false,
        },
    };
    let before = Instant::now();
    let bytes = encode_to_worker(&msg).unwrap();
    let ToWorker::Submit { input, .. } = decode_to_worker(&bytes).unwrap() else {
        panic!("not a submit");
    };
    // An expired deadline arrives expired (now, not 5 s ago: clocks are not compared).
    assert!(input.request.deadline >= before);
    assert!(input.request.deadline <= Instant::now());
}

#[test]
fn every_truncation_is_an_error() {
    for (bytes, to_worker) in encoded_samples() {
        for len in 0..bytes.len() {
            assert!(!decodes(&bytes[..len], to_worker), "prefix {len} decoded");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        let err = if to_worker {
            decode_to_worker(&longer).err()
        } else {
            decode_from_worker(&longer).err()
        };
        assert_eq!(err, Some(RemoteError::TrailingBytes(1)));
    }
}

#[test]
fn bad_headers_and_tags_are_refused() {
    let good = encode_to_worker(&ToWorker::Cancel { job: JobId(1) }).unwrap();
    let with = |i: usize, v: u8| {
        let mut b = good.clone();
        b[i] = v;
        decode_to_worker(&b).err().unwrap()
    };
    assert_eq!(with(0, b'X'), RemoteError::BadMagic);
    assert_eq!(with(4, 9), RemoteError::UnsupportedVersion(9));
    assert!(matches!(
        with(7, 200),
        RemoteError::UnknownTag {
            what: "message",
            tag: 200
        }
    ));
    let mut hold = encode_to_worker(&ToWorker::Hold {
        job: JobId(1),
        held: true,
    })
    .unwrap();
    *hold.last_mut().unwrap() = 2;
    assert_eq!(decode_to_worker(&hold).err(), Some(RemoteError::BadFlag(2)));
    let mut failed = encode_from_worker(&FromWorker::Event {
        job: JobId(1),
        event: StageEvent::Failed(EngineError::Compute("x".into())),
    })
    .unwrap();
    failed[super::HEADER_LEN + 9] = 9;
    assert!(matches!(
        decode_from_worker(&failed),
        Err(RemoteError::UnknownTag {
            what: "engine error",
            tag: 9
        })
    ));
}

#[test]
fn inconsistent_media_and_payloads_are_refused() {
    let mut req = request(1, Prompt::Completion("x".into()));
    let two = RgbImages {
        pixels: vec![0; 2 * 3].into(),
        n: 2,
        height: 1,
        width: 1,
    };
    req.media.push(MediaInput {
        data: MediaData::Image(two),
        digest: MediaDigest([0; 32]),
    });
    let submit = |req: JobRequest| ToWorker::Submit {
        job: JobId(1),
        input: StageInput {
            request: Arc::new(req),
            upstream: Vec::new(),
            client_facing: true,
            streaming: false,
        },
    };
    assert!(matches!(
        encode_to_worker(&submit(req.clone())),
        Err(RemoteError::InvalidMedia(_))
    ));
    // Crafted bytes with the same item are refused by the decoder too: encode a one-image item,
    // then patch its `n` (first shape field of the wire image body) to 2 and its pixel count.
    req.media[0] = MediaInput::image(vec![0; 6], 2, 1).unwrap();
    let mut bytes = encode_to_worker(&submit(req.clone())).unwrap();
    // The item is followed by the two absent route fields (2 bytes), the upstream count and two
    // flags (10 bytes).
    let wire_at = bytes.len() - 12 - (wire::HEADER_LEN + 32 + 6);
    bytes[wire_at + wire::HEADER_LEN..][..8].copy_from_slice(&2u64.to_le_bytes());
    bytes[wire_at + wire::HEADER_LEN + 16..][..8].copy_from_slice(&1u64.to_le_bytes());
    assert!(matches!(
        decode_to_worker(&bytes),
        Err(RemoteError::InvalidMedia(_))
    ));
    // An inconsistent payload fails to encode with the wire error.
    let bad = Payload::Hidden(HiddenStates {
        data: vec![0.0; 5].into(),
        rows: 2,
        dim: 2,
    });
    let feed = ToWorker::Feed {
        job: JobId(1),
        payloads: vec![bad],
        last: false,
    };
    assert!(matches!(
        encode_to_worker(&feed),
        Err(RemoteError::Payload(_))
    ));
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn corrupted_and_random_bytes_never_panic() {
    let samples = encoded_samples();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for case in 0..4000 {
        let (base, to_worker) = &samples[rng.below(samples.len())];
        let mut bytes = base.clone();
        match case % 4 {
            // Flip a few bytes, possibly in length fields.
            0 | 1 => {
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(bytes.len());
                    bytes[i] = rng.next() as u8;
                }
            }
            // Write a huge or random u64 somewhere (a count or length).
            2 => {
                let i = rng.below(bytes.len().saturating_sub(8).max(1));
                let v = if rng.below(2) == 0 {
                    u64::MAX - rng.below(4) as u64
                } else {
                    rng.next()
                };
                let end = (i + 8).min(bytes.len());
                bytes[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
            }
            // A valid header followed by random bytes.
            _ => {
                bytes.truncate(super::HEADER_LEN);
                bytes[7] = rng.below(8) as u8;
                for _ in 0..rng.below(200) {
                    bytes.push(rng.next() as u8);
                }
            }
        }
        let (_, allocated) = allocated_by(|| decodes(&bytes, *to_worker));
        // Never more than a small multiple of the input (plus a constant for error messages).
        assert!(
            allocated <= 64 * bytes.len() + 4096,
            "case {case}: {allocated} bytes"
        );
    }
}

#[test]
fn huge_declared_counts_are_refused_without_allocating() {
    let body = |tag: u8, fields: &[u8]| {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&[DIR_TO_WORKER, tag]);
        b.extend_from_slice(fields);
        b
    };
    // The counter sees this thread's allocations (a real decode allocates its payloads).
    let sample = encode_to_worker(&to_worker_samples().swap_remove(4)).unwrap();
    let (decoded, allocated) = allocated_by(|| decode_to_worker(&sample));
    assert!(decoded.is_ok() && allocated > 100, "{allocated}");
    let job = 1u64.to_le_bytes();
    for count in [u64::MAX, 1 << 40, u64::MAX / 24 + 1, 1000] {
        // Feed with a huge payload count.
        let feed = body(2, &[&job[..], &count.to_le_bytes(), &[0u8; 24]].concat());
        // Submit whose chat prompt declares a huge number of messages.
        let chat = body(
            1,
            &[&job[..], &job[..], &[1u8], &count.to_le_bytes()].concat(),
        );
        // Submit whose completion prompt declares a huge string.
        let text = body(
            1,
            &[&job[..], &job[..], &[2u8], &count.to_le_bytes()].concat(),
        );
        // Feed with one payload declaring a huge length.
        let long = body(
            2,
            &[&job[..], &1u64.to_le_bytes(), &count.to_le_bytes()].concat(),
        );
        for bytes in [feed, chat, text, long] {
            let (result, allocated) = allocated_by(|| decode_to_worker(&bytes));
            assert!(
                matches!(
                    result,
                    Err(RemoteError::Truncated { .. } | RemoteError::Overflow(_))
                ),
                "{result:?}"
            );
            assert!(allocated < 1024, "{allocated} bytes allocated for {count}");
        }
    }
}
