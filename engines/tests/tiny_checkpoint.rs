//! `make-tiny` writes deterministic, loadable checkpoints in the Hugging Face layout.

use omnistage_engines::llm::chat_template::ChatTemplate;
use omnistage_engines::llm::config::LlmConfig;
use omnistage_engines::llm::generation_config::GenerationConfig;
use omnistage_engines::llm::tokenizer::{StreamDecoder, TextTokenizer};
use omnistage_engines::tiny::{make_tiny, write_tiny_llm, TinyFamily, TinyLlmSpec, IM_END};
use omnistage_stages::ChatMessage;
use std::path::Path;
use std::time::Instant;

const FILES: [&str; 6] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
];

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn same_seed_is_byte_identical_and_seed_changes_weights() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let start = Instant::now();
    let ma = make_tiny(a.path(), 7).unwrap();
    let elapsed = start.elapsed();
    let mb = make_tiny(b.path(), 7).unwrap();
    let mc = make_tiny(c.path(), 8).unwrap();
    assert!(elapsed.as_secs_f64() < 5.0, "make_tiny took {elapsed:?}");

    let thinker = ma.checkpoint("thinker").expect("thinker checkpoint");
    assert_eq!(thinker.kind, "llm");
    assert_eq!(thinker.dir, a.path().join("tiny-omni/thinker"));
    let names: Vec<_> = thinker
        .files
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(names, FILES);
    let image = ma.checkpoint("image").expect("image pipeline checkpoint");
    assert_eq!(image.dir, a.path().join("tiny-omni/image"));
    for component in [
        "model_index.json",
        "text_encoder/config.json",
        "tokenizer/tokenizer.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ] {
        let path = image.dir.join(component);
        assert!(image.files.contains(&path), "{component} not written");
        let rel = Path::new("tiny-omni/image").join(component);
        assert_eq!(
            read(&a.path().join(&rel)),
            read(&b.path().join(&rel)),
            "{component} differs between two runs with the same seed"
        );
    }
    // The speech branch: a talker (tokenizer, config, weights with the thinker projection) and
    // a SNAC codec, each byte-identical for a seed.
    let talker = ma.checkpoint("talker").expect("talker checkpoint");
    let codec = ma.checkpoint("codec").expect("codec checkpoint");
    assert_eq!(talker.dir, a.path().join("tiny-omni/talker"));
    assert_eq!(codec.dir, a.path().join("tiny-omni/codec"));
    for file in talker.files.iter().chain(&codec.files) {
        let rel = file.strip_prefix(a.path()).unwrap();
        assert_eq!(
            read(&a.path().join(rel)),
            read(&b.path().join(rel)),
            "{} differs between two runs with the same seed",
            rel.display()
        );
    }
    assert!(codec.files.iter().any(|f| f.ends_with("config.json")));
    // The senses: a vision and an audio encoder, each byte-identical for a seed.
    let vision = ma.checkpoint("vision-encoder").expect("vision checkpoint");
    let audio = ma.checkpoint("audio-encoder").expect("audio checkpoint");
    assert_eq!(vision.dir, a.path().join("tiny-omni/vision"));
    assert_eq!(audio.dir, a.path().join("tiny-omni/audio"));
    for file in vision.files.iter().chain(&audio.files) {
        let rel = file.strip_prefix(a.path()).unwrap();
        assert_eq!(
            read(&a.path().join(rel)),
            read(&b.path().join(rel)),
            "{} differs between two runs with the same seed",
            rel.display()
        );
    }
    assert_eq!(
        ma.files().count(),
        FILES.len()
            + image.files.len()
            + talker.files.len()
            + codec.files.len()
            + vision.files.len()
            + audio.files.len()
    );

    for name in FILES {
        let rel = Path::new("tiny-omni/thinker").join(name);
        let (fa, fb, fc) = (
            read(&a.path().join(&rel)),
            read(&b.path().join(&rel)),
            read(&c.path().join(&rel)),
        );
        assert_eq!(fa, fb, "{name} differs between two runs with the same seed");
        if name == "model.safetensors" {
            assert_ne!(fa, fc, "a different seed must change the weights");
        } else {
            assert_eq!(fa, fc, "{name} should not depend on the seed");
        }
    }
    assert_eq!(mb.root, b.path().join("tiny-omni"));
    assert_eq!(mc.checkpoints.len(), 6);
}

#[test]
fn weights_have_hf_names_shapes_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let m = make_tiny(dir.path(), 1).unwrap();
    let bytes = read(
        &m.checkpoint("thinker")
            .unwrap()
            .dir
            .join("model.safetensors"),
    );
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let shape = |name: &str| {
        st.tensor(name)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .shape()
            .to_vec()
    };
    // 512 tokenizer ids and the image and audio placeholders.
    assert_eq!(shape("model.embed_tokens.weight"), [514, 64]);
    assert_eq!(shape("lm_head.weight"), [514, 64]);
    assert_eq!(shape("model.norm.weight"), [64]);
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        assert_eq!(shape(&format!("{p}.self_attn.q_proj.weight")), [64, 64]);
        assert_eq!(shape(&format!("{p}.self_attn.k_proj.weight")), [32, 64]);
        assert_eq!(shape(&format!("{p}.self_attn.v_proj.weight")), [32, 64]);
        assert_eq!(shape(&format!("{p}.self_attn.o_proj.weight")), [64, 64]);
        assert_eq!(shape(&format!("{p}.self_attn.q_norm.weight")), [16]);
        assert_eq!(shape(&format!("{p}.self_attn.k_norm.weight")), [16]);
        assert_eq!(shape(&format!("{p}.mlp.gate_proj.weight")), [128, 64]);
        assert_eq!(shape(&format!("{p}.mlp.up_proj.weight")), [128, 64]);
        assert_eq!(shape(&format!("{p}.mlp.down_proj.weight")), [64, 128]);
        assert_eq!(shape(&format!("{p}.input_layernorm.weight")), [64]);
        assert_eq!(shape(&format!("{p}.post_attention_layernorm.weight")), [64]);
    }
    assert_eq!(st.len(), 3 + 2 * 11);
    let values = |name: &str| -> Vec<f32> {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        t.data()
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    assert!(values("model.norm.weight").iter().all(|&v| v == 1.0));
    let q = values("model.layers.0.self_attn.q_proj.weight");
    let std = (q.iter().map(|v| v * v).sum::<f32>() / q.len() as f32).sqrt();
    assert!((0.02..=0.1).contains(&std), "q_proj std {std}");
    assert_ne!(q, values("model.layers.1.self_attn.q_proj.weight"));
}

#[test]
fn tokenizer_round_trips_and_streams() {
    let dir = tempfile::tempdir().unwrap();
    let m = make_tiny(dir.path(), 3).unwrap();
    let tok = TextTokenizer::load(&m.checkpoint("thinker").unwrap().dir).unwrap();
    assert_eq!(tok.vocab_size(), 514);
    assert_eq!(tok.token_id("<|IMAGE|>"), Some(512));
    assert_eq!(tok.token_id("<|AUDIO|>"), Some(513));
    let im_end = tok.token_id(IM_END).unwrap();
    assert_eq!(tok.token_id("<|endoftext|>"), Some(509));
    assert_eq!(im_end, 511);

    let texts = [
        "The morning train left the station at seven.",
        "Café, naïve résumé — 日本語のテキスト 🦀🎉 done!",
        "  leading spaces, tabs\tand\nnewlines\n\n",
        "",
    ];
    for text in texts {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        assert_eq!(tok.encode(text, true).unwrap(), ids, "no BOS is added");

        // Streaming, with special tokens mixed in: never a partial char, and the pieces add up.
        let mut stream: Vec<u32> = ids.clone();
        stream.insert(stream.len() / 2, im_end);
        stream.push(im_end);
        let mut dec = StreamDecoder::new();
        let mut out = String::new();
        for &id in &stream {
            if let Some(piece) = dec.push(&tok, id).unwrap() {
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "partial char streamed for {text:?}: {piece:?}"
                );
                out.push_str(&piece);
            }
        }
        out.push_str(&dec.flush(&tok).unwrap().unwrap_or_default());
        assert_eq!(out, text);
        assert_eq!(out, tok.decode(&stream, true).unwrap());
    }

    // Multi-byte characters really are split across byte tokens (the emoji has no merges).
    let crab = tok.encode("🦀", false).unwrap();
    assert!(crab.len() > 1, "{crab:?}");

    // Special tokens in text are recognised as single ids.
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(ids.first(), Some(&510));
    assert_eq!(ids.last(), Some(&im_end));
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
}

#[test]
fn stream_decoder_matches_decode_on_arbitrary_ids() {
    // Random ids (as an untrained model emits) include lone continuation bytes; the streamed
    // text must still equal decode() once flushed.
    let dir = tempfile::tempdir().unwrap();
    let m = make_tiny(dir.path(), 3).unwrap();
    let tok = TextTokenizer::load(&m.checkpoint("thinker").unwrap().dir).unwrap();
    let mut x: u64 = 12345;
    for _ in 0..20 {
        let mut ids = Vec::new();
        for _ in 0..40 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ids.push(((x >> 33) % 512) as u32);
        }
        let mut dec = StreamDecoder::new();
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&dec.push(&tok, id).unwrap().unwrap_or_default());
        }
        out.push_str(&dec.flush(&tok).unwrap().unwrap_or_default());
        assert_eq!(out, tok.decode(&ids, true).unwrap(), "ids {ids:?}");
    }
}

#[test]
fn chat_template_and_generation_config() {
    let dir = tempfile::tempdir().unwrap();
    let m = make_tiny(dir.path(), 0).unwrap();
    let ckpt = &m.checkpoint("thinker").unwrap().dir;
    let t = ChatTemplate::load(ckpt)
        .unwrap()
        .expect("tiny checkpoint has a chat template");
    assert_eq!(t.eos_token(), Some(IM_END));
    let messages = [
        ChatMessage {
            role: "system".into(),
            content: "Be brief.".into(),
        },
        ChatMessage {
            role: "user".into(),
            content: "Hi!".into(),
        },
    ];
    let prompt = t.render(&messages, true).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    );
    let tok = TextTokenizer::load(ckpt).unwrap();
    let ids = tok.encode(&prompt, false).unwrap();
    assert_eq!(ids.iter().filter(|&&id| id == 510).count(), 3);

    let g = GenerationConfig::load(ckpt).unwrap();
    assert_eq!(g.eos_token_ids, vec![511, 509]);
    assert_eq!(g.bos_token_id, Some(509));
    assert_eq!(g.do_sample, Some(true));
    assert_eq!(g.temperature, Some(0.7));
    assert_eq!(g.top_p, Some(0.8));
}

#[test]
fn config_parses_with_llm_config() {
    let dir = tempfile::tempdir().unwrap();
    let m = make_tiny(dir.path(), 0).unwrap();
    let cfg =
        LlmConfig::from_file(&m.checkpoint("thinker").unwrap().dir.join("config.json")).unwrap();
    assert_eq!(cfg.vocab_size, 514);
    assert_eq!(cfg.hidden_size, 64);
    assert_eq!(cfg.num_hidden_layers, 2);
    assert_eq!(cfg.num_attention_heads, 4);
    assert_eq!(cfg.num_key_value_heads, 2);
    assert_eq!(cfg.head_dim, 16);
    assert_eq!(cfg.intermediate_size, 128);
    assert_eq!(cfg.max_position_embeddings, 2048);
    assert!(cfg.qk_norm);
    assert!(!cfg.tie_word_embeddings);
    assert_eq!(cfg.rope_theta, 1e6);
    assert_eq!(cfg.rms_norm_eps, 1e-6);
}

#[test]
fn other_families_and_sizes() {
    for family in [TinyFamily::Llama, TinyFamily::Qwen2, TinyFamily::Qwen3] {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = TinyLlmSpec::tiny(family);
        spec.vocab_size = Some(640);
        spec.tie_word_embeddings = family == TinyFamily::Llama;
        let files = write_tiny_llm(dir.path(), &spec, 5).unwrap();
        assert_eq!(files.len(), FILES.len());
        let cfg = LlmConfig::from_file(&dir.path().join("config.json")).unwrap();
        assert_eq!(cfg.vocab_size, 640);
        assert_eq!(cfg.qk_norm, family == TinyFamily::Qwen3);
        assert_eq!(cfg.qkv_bias, family == TinyFamily::Qwen2);
        assert_eq!(cfg.tie_word_embeddings, family == TinyFamily::Llama);
        let bytes = read(&dir.path().join("model.safetensors"));
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(
            st.tensor("model.embed_tokens.weight").unwrap().shape(),
            [640, 64]
        );
        assert_eq!(
            st.tensor("lm_head.weight").is_ok(),
            family != TinyFamily::Llama
        );
        assert_eq!(
            st.tensor("model.layers.0.self_attn.q_proj.bias").is_ok(),
            family == TinyFamily::Qwen2
        );
        assert_eq!(
            st.tensor("model.layers.1.self_attn.k_norm.weight").is_ok(),
            family == TinyFamily::Qwen3
        );
    }
    let mut bad = TinyLlmSpec::tiny_qwen3();
    bad.num_attention_heads = 0;
    let dir = tempfile::tempdir().unwrap();
    assert!(write_tiny_llm(dir.path(), &bad, 0).is_err());
}

#[test]
fn checkpoints_load_and_run_with_llm_model() {
    use candle_core::{DType, Device};
    use omnistage_engines::llm::model::{LlmModel, SeqChunk};
    for family in [TinyFamily::Llama, TinyFamily::Qwen2, TinyFamily::Qwen3] {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_llm(dir.path(), &TinyLlmSpec::tiny(family), 11).unwrap();
        let model = LlmModel::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
        let tok = TextTokenizer::load(dir.path()).unwrap();
        let ids = tok.encode("The garden behind the house", false).unwrap();
        let mut cache = model.new_cache();
        let out = model
            .forward(&mut [SeqChunk {
                tokens: &ids,
                cache: &mut cache,
                want_hidden: false,
            }])
            .unwrap();
        let logits: Vec<f32> = out.logits.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(logits.len(), 512);
        assert!(logits.iter().all(|v| v.is_finite()), "{family:?}");
        let mean = logits.iter().sum::<f32>() / 512.0;
        let std = (logits.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 512.0).sqrt();
        assert!((0.3..5.0).contains(&std), "{family:?}: logits std {std}");
    }
}
