//! Round trips of every payload kind and decoding of hostile bytes.

use super::*;

fn f(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| seed + i as f32 * 0.25).collect()
}

/// One payload of every kind, with non-trivial shapes.
pub(crate) fn samples() -> Vec<Payload> {
    let emb = |seed| TextEmbedding {
        tokens: HiddenStates::new(f(12, seed), 4),
        pooled: f(3, seed).into(),
    };
    vec![
        Payload::Text("héllo, wörld ✓".into()),
        Payload::Text("".into()),
        Payload::Tokens(vec![1, 2, u32::MAX, 0].into()),
        Payload::Hidden(HiddenStates::new(f(64, 1.0), 16)),
        Payload::Hidden(HiddenStates::new(Vec::new(), 8)),
        Payload::Embeddings(Arc::new(Conditioning {
            positive: emb(1.0),
            negative: Some(emb(-1.0)),
        })),
        Payload::Embeddings(Arc::new(Conditioning {
            positive: emb(2.0),
            negative: None,
        })),
        Payload::MediaEmbeddings(
            vec![
                MediaEmbedding {
                    media: 0,
                    rows: HiddenStates::new(f(8, 0.5), 4),
                },
                MediaEmbedding {
                    media: 3,
                    rows: HiddenStates::new(f(12, 0.5), 4),
                },
            ]
            .into(),
        ),
        Payload::Latents(Latents {
            data: f(2 * 4 * 3 * 5, 0.0).into(),
            n: 2,
            channels: 4,
            height: 3,
            width: 5,
        }),
        Payload::Image(RgbImages {
            pixels: (0..2 * 3 * 4 * 3).map(|i| i as u8).collect(),
            n: 2,
            height: 3,
            width: 4,
        }),
        Payload::Codes(CodecFrames::new((0..21).collect(), 7).unwrap()),
        Payload::Pcm(PcmAudio {
            samples: vec![0.0, -1.0, 1.0, f32::MIN_POSITIVE, -0.0].into(),
            sample_rate: 24_000,
        }),
        Payload::Route(Arc::new(RouteDecision {
            selected: vec!["math".into(), "códe".into()],
            scores: vec![
                ("math".into(), 0.7),
                ("códe".into(), 0.2),
                ("chat".into(), 0.1),
            ],
            reason: "model".into(),
        })),
        Payload::Route(Arc::new(RouteDecision {
            selected: vec!["vision".into()],
            scores: Vec::new(),
            reason: "input:image -> vision".into(),
        })),
        Payload::MotStates(MotStates {
            stack: 2,
            expert: 1,
            states: HiddenStates::new(f(24, -0.5), 8),
        }),
    ]
}

#[test]
fn every_variant_round_trips() {
    for p in samples() {
        let bytes = encode(&p).unwrap();
        assert_eq!(bytes.len(), encoded_len(&p), "{}", p.kind());
        assert_eq!(peek_kind(&bytes).unwrap(), p.kind());
        assert_eq!(decode(&bytes).unwrap(), p, "{}", p.kind());
    }
    let covered: std::collections::BTreeSet<_> = samples().iter().map(|p| p.kind()).collect();
    assert_eq!(covered.len(), PayloadKind::ALL.len());
}

#[test]
fn nan_bits_survive() {
    let p = Payload::Pcm(PcmAudio {
        samples: vec![f32::from_bits(0x7fc0_1234)].into(),
        sample_rate: 1,
    });
    match decode(&encode(&p).unwrap()).unwrap() {
        Payload::Pcm(a) => assert_eq!(a.samples[0].to_bits(), 0x7fc0_1234),
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_truncation_is_an_error() {
    for p in samples() {
        let bytes = encode(&p).unwrap();
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "{} cut at {cut}", p.kind());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
    }
}

#[test]
fn corrupted_and_random_buffers_never_panic() {
    // xorshift: deterministic, no dependency.
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for p in samples() {
        let bytes = encode(&p).unwrap();
        for _ in 0..2000 {
            let mut b = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
            let _ = decode(&b);
        }
        // Corrupt the header's body length and shape fields with extreme values.
        for at in (8..bytes.len().saturating_sub(7)).step_by(8) {
            for v in [u64::MAX, u64::MAX / 4 + 1, 1 << 62, 0] {
                let mut b = bytes.clone();
                b[at..at + 8].copy_from_slice(&v.to_le_bytes());
                let _ = decode(&b);
            }
        }
    }
    for len in 0..256 {
        let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let _ = decode(&b);
        if b.len() >= HEADER_LEN {
            b[..4].copy_from_slice(&MAGIC);
            b[4..6].copy_from_slice(&VERSION.to_le_bytes());
            b[6] = 1 + (next() % 9) as u8;
            b[7] = 0;
            let body = (b.len() - HEADER_LEN) as u64;
            b[8..16].copy_from_slice(&body.to_le_bytes());
            let _ = decode(&b);
        }
    }
}

#[test]
fn typed_errors_name_the_problem() {
    let good = encode(&Payload::Text("hi".into())).unwrap();
    let mut b = good.clone();
    b[0] = b'X';
    assert_eq!(decode(&b), Err(WireError::BadMagic));
    let mut b = good.clone();
    b[4] = 9;
    assert_eq!(decode(&b), Err(WireError::UnsupportedVersion(9)));
    let mut b = good.clone();
    b[6] = 200;
    assert_eq!(decode(&b), Err(WireError::UnknownKind(200)));
    let mut b = good.clone();
    b[HEADER_LEN + 8] = 0xff;
    assert_eq!(decode(&b), Err(WireError::InvalidUtf8));
    // A hidden block whose shape disagrees with its element count.
    let mut b = encode(&Payload::Hidden(HiddenStates::new(f(6, 0.0), 3))).unwrap();
    b[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&3u64.to_le_bytes());
    assert!(matches!(decode(&b), Err(WireError::Shape { .. })));
    // Inconsistent structs are refused at encode time.
    let bad = Payload::Hidden(HiddenStates {
        data: f(5, 0.0).into(),
        rows: 2,
        dim: 2,
    });
    assert!(matches!(encode(&bad), Err(WireError::Shape { .. })));
    let mut small = [0u8; 4];
    assert!(matches!(
        encode_into(&Payload::Text("hi".into()), &mut small),
        Err(WireError::BufferTooSmall { .. })
    ));
}
