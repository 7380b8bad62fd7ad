//! Correctness of the per-sequence-cache LLM forward against candle-transformers' own models.
//!
//! Seeded random checkpoints (Qwen2 with QKV bias, Qwen3 with q/k norm and an explicit head_dim
//! and tied embeddings, Llama with Llama 3 RoPE scaling) are written to a temp dir as
//! `config.json` + `model.safetensors` and loaded through the real loading path. Prompts of
//! different lengths join one running batch at different steps (a new prompt's prefill shares a
//! forward with running sequences' decode tokens, the longest prompt is prefilled in chunks) and
//! finish at different times. Each must produce exactly the greedy tokens, and within 1e-4 the
//! logits, that candle-transformers' model produces for that prompt alone.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, qwen2, qwen3};
use omnistage_engines::llm::config::LlmConfig;
use omnistage_engines::llm::model::{LlmError, LlmModel, SeqChunk, SeqKvCache};
use omnistage_engines::llm::weights::WeightsError;
use rand::{rngs::StdRng, Rng, SeedableRng};

const NEW_TOKENS: usize = 12;
const TOL: f32 = 1e-4;

const QWEN2_CONFIG: &str = r#"{
  "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 256,
  "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
  "sliding_window": 512, "max_window_layers": 3, "tie_word_embeddings": false,
  "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "use_sliding_window": false,
  "hidden_act": "silu", "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2
}"#;

const QWEN3_CONFIG: &str = r#"{
  "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 256,
  "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
  "attention_bias": false, "max_position_embeddings": 512, "sliding_window": null,
  "max_window_layers": 2, "tie_word_embeddings": true, "rope_theta": 1000000,
  "rms_norm_eps": 1e-6, "use_sliding_window": false, "hidden_act": "silu",
  "dtype": "bfloat16", "eos_token_id": [2, 3]
}"#;

const LLAMA_CONFIG: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256,
  "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
  "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
  "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"
}"#;

/// Uniform noise with the given mean and standard deviation.
fn rand_tensor(rng: &mut StdRng, shape: &[usize], mean: f32, std: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let a = std * 3f32.sqrt();
    let v: Vec<f32> = (0..n).map(|_| mean + rng.gen_range(-a..a)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Writes `config.json` and a seeded random `model.safetensors` with HF tensor names.
fn write_checkpoint(dir: &Path, config: &str, seed: u64, skip: Option<&str>) -> LlmConfig {
    let cfg = LlmConfig::from_json_str(config).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let (h, d, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let mut t = HashMap::new();
    let mut put = |t: &mut HashMap<String, Tensor>, name: String, shape: &[usize], mean, std| {
        t.insert(name, rand_tensor(&mut rng, shape, mean, std));
    };
    // With tied embeddings a large embedding makes every token predict itself: keep it small
    // against the layers' contributions so greedy decoding wanders.
    let embed_std = if cfg.tie_word_embeddings { 0.05 } else { 0.5 };
    put(
        &mut t,
        "model.embed_tokens.weight".into(),
        &[cfg.vocab_size, h],
        0.0,
        embed_std,
    );
    put(&mut t, "model.norm.weight".into(), &[h], 1.0, 0.1);
    if !cfg.tie_word_embeddings {
        put(
            &mut t,
            "lm_head.weight".into(),
            &[cfg.vocab_size, h],
            0.0,
            0.2,
        );
    }
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let w = 1.0 / (h as f32).sqrt();
        for (name, out) in [("q_proj", nq * d), ("k_proj", nkv * d), ("v_proj", nkv * d)] {
            put(
                &mut t,
                format!("{p}.self_attn.{name}.weight"),
                &[out, h],
                0.0,
                2.0 * w,
            );
            if cfg.qkv_bias {
                put(
                    &mut t,
                    format!("{p}.self_attn.{name}.bias"),
                    &[out],
                    0.0,
                    0.3,
                );
            }
        }
        put(
            &mut t,
            format!("{p}.self_attn.o_proj.weight"),
            &[h, nq * d],
            0.0,
            w,
        );
        if cfg.qk_norm {
            put(
                &mut t,
                format!("{p}.self_attn.q_norm.weight"),
                &[d],
                1.0,
                0.2,
            );
            put(
                &mut t,
                format!("{p}.self_attn.k_norm.weight"),
                &[d],
                1.0,
                0.2,
            );
        }
        put(&mut t, format!("{p}.mlp.gate_proj.weight"), &[i, h], 0.0, w);
        put(&mut t, format!("{p}.mlp.up_proj.weight"), &[i, h], 0.0, w);
        put(
            &mut t,
            format!("{p}.mlp.down_proj.weight"),
            &[h, i],
            0.0,
            1.0 / (i as f32).sqrt(),
        );
        put(
            &mut t,
            format!("{p}.input_layernorm.weight"),
            &[h],
            1.0,
            0.1,
        );
        put(
            &mut t,
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            1.0,
            0.1,
        );
    }
    if let Some(skip) = skip {
        t.remove(skip);
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    cfg
}

fn ref_vb(dir: &Path) -> VarBuilder<'static> {
    // SAFETY: the temp checkpoint is not modified while mapped.
    unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A reference single-sequence step: `(tokens, offset) -> logits of the last token`.
type RefStep<'a> = dyn FnMut(&[u32], usize) -> Vec<f32> + 'a;

/// A reference final-norm hidden state of a whole prompt: `[len, hidden]`.
type RefHidden<'a> = dyn FnMut(&[u32]) -> Tensor + 'a;

/// Greedy-decodes `prompt` alone with the reference; returns the tokens and each step's logits.
fn reference_generate(step: &mut RefStep<'_>, prompt: &[u32]) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut logits = vec![step(prompt, 0)];
    let mut tokens = vec![argmax(&logits[0])];
    while tokens.len() < NEW_TOKENS {
        let pos = prompt.len() + tokens.len() - 1;
        let l = step(&[*tokens.last().unwrap()], pos);
        tokens.push(argmax(&l));
        logits.push(l);
    }
    (tokens, logits)
}

fn prompts() -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(7);
    [3usize, 7, 12, 20, 5]
        .iter()
        .map(|&n| (0..n).map(|_| rng.gen_range(0..256u32)).collect())
        .collect()
}

/// When each prompt joins the running batch.
const ADMIT_AT: [usize; 5] = [0, 0, 2, 3, 9];
/// Prefill chunk size limit (the 20-token prompt is prefilled over several steps).
const CHUNK: usize = 8;

struct Running {
    idx: usize,
    prompt: Vec<u32>,
    prefilled: usize,
    generated: Vec<u32>,
    logits: Vec<Vec<f32>>,
    hidden: Vec<Tensor>,
    cache: SeqKvCache,
}

/// One prompt's batched result: generated tokens, each step's logits, prompt hidden states.
type Generated = (Vec<u32>, Vec<Vec<f32>>, Tensor);

/// Drives the continuous batch; returns each prompt's result.
fn run_batched(model: &LlmModel, prompts: &[Vec<u32>]) -> Vec<Generated> {
    let mut done: Vec<Option<Generated>> = vec![None; prompts.len()];
    let mut running: Vec<Running> = Vec::new();
    let mut step = 0;
    let mut mixed_steps = 0;
    while done.iter().any(Option::is_none) {
        for (idx, p) in prompts.iter().enumerate() {
            if ADMIT_AT[idx] == step {
                running.push(Running {
                    idx,
                    prompt: p.clone(),
                    prefilled: 0,
                    generated: vec![],
                    logits: vec![],
                    hidden: vec![],
                    cache: model.new_cache(),
                });
            }
        }
        if step % 2 == 1 {
            running.reverse(); // batch order must not matter
        }
        // Each sequence's next chunk: a prefill chunk, or its last generated token.
        let inputs: Vec<Vec<u32>> = running
            .iter()
            .map(|r| {
                if r.prefilled < r.prompt.len() {
                    let end = (r.prefilled + CHUNK).min(r.prompt.len());
                    r.prompt[r.prefilled..end].to_vec()
                } else {
                    vec![*r.generated.last().unwrap()]
                }
            })
            .collect();
        let prefilling = running
            .iter()
            .filter(|r| r.prefilled < r.prompt.len())
            .count();
        if prefilling > 0 && prefilling < running.len() {
            mixed_steps += 1;
        }
        let mut chunks: Vec<SeqChunk<'_>> = running
            .iter_mut()
            .zip(&inputs)
            .map(|(r, t)| SeqChunk {
                tokens: t,
                want_hidden: r.prefilled < r.prompt.len(),
                cache: &mut r.cache,
            })
            .collect();
        let out = model.forward(&mut chunks).unwrap();
        drop(chunks);
        assert_eq!(
            out.logits.dims(),
            &[running.len(), model.config().vocab_size]
        );
        assert_eq!(out.logits.dtype(), DType::F32);
        for (i, (r, t)) in running.iter_mut().zip(&inputs).enumerate() {
            if r.prefilled < r.prompt.len() {
                let hid = out.hidden[i].clone().expect("hidden requested");
                assert_eq!(hid.dims(), &[t.len(), model.config().hidden_size]);
                r.hidden.push(hid);
                r.prefilled += t.len();
                if r.prefilled < r.prompt.len() {
                    continue; // mid-prompt chunk: its logits are not a prediction we use
                }
            } else {
                assert!(out.hidden[i].is_none());
            }
            let l: Vec<f32> = out.logits.i(i).unwrap().to_vec1().unwrap();
            r.generated.push(argmax(&l));
            r.logits.push(l);
            assert_eq!(r.cache.len(), r.prompt.len() + r.generated.len() - 1);
        }
        running.retain_mut(|r| {
            if r.generated.len() < NEW_TOKENS {
                return true;
            }
            let hidden = Tensor::cat(&r.hidden, 0).unwrap();
            done[r.idx] = Some((
                std::mem::take(&mut r.generated),
                std::mem::take(&mut r.logits),
                hidden,
            ));
            false
        });
        step += 1;
        assert!(step < 100, "batch never drained");
    }
    assert!(
        mixed_steps >= 3,
        "too few steps mixing prefill and decode: {mixed_steps}"
    );
    done.into_iter().map(Option::unwrap).collect()
}

/// Compares the batched run with the reference, prompt by prompt.
fn check_against_reference(
    model: &LlmModel,
    step: &mut RefStep<'_>,
    mut ref_hidden: Option<&mut RefHidden<'_>>,
) {
    let prompts = prompts();
    let batched = run_batched(model, &prompts);
    let mut all_tokens = Vec::new();
    for (p, (tokens, logits, hidden)) in prompts.iter().zip(batched) {
        let (ref_tokens, ref_logits) = reference_generate(step, p);
        let distinct: std::collections::HashSet<_> = ref_tokens.iter().collect();
        assert!(
            distinct.len() >= 2,
            "degenerate reference output {ref_tokens:?}"
        );
        assert_eq!(tokens, ref_tokens, "prompt of {} tokens", p.len());
        for (j, (a, b)) in logits.iter().zip(&ref_logits).enumerate() {
            let diff = max_abs_diff(a, b);
            assert!(
                diff < TOL,
                "prompt len {} step {j}: logits differ by {diff}",
                p.len()
            );
        }
        if let Some(f) = ref_hidden.as_mut() {
            let r: Vec<Vec<f32>> = f(p).to_vec2().unwrap();
            let h: Vec<Vec<f32>> = hidden.to_vec2().unwrap();
            assert_eq!(r.len(), h.len());
            for (a, b) in h.iter().zip(&r) {
                assert!(max_abs_diff(a, b) < TOL, "hidden states differ");
            }
        }
        all_tokens.push(tokens);
    }
    let distinct: std::collections::HashSet<_> = all_tokens.iter().flatten().collect();
    assert!(
        distinct.len() >= 20,
        "greedy outputs barely vary: {all_tokens:?}"
    );
}

#[test]
fn qwen2_continuous_batch_matches_candle_transformers() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), QWEN2_CONFIG, 11, None);
    let model = LlmModel::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert!(model.config().qkv_bias && !model.config().o_bias);
    let rcfg: qwen2::Config = serde_json::from_str(QWEN2_CONFIG).unwrap();
    let mut reference = qwen2::ModelForCausalLM::new(&rcfg, ref_vb(dir.path())).unwrap();
    let mut base = qwen2::Model::new(&rcfg, ref_vb(dir.path())).unwrap();
    let mut step = |t: &[u32], pos: usize| -> Vec<f32> {
        if pos == 0 {
            reference.clear_kv_cache();
        }
        let input = Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        // Returns [1, 1, vocab]: logits of the last position only.
        let l = reference.forward(&input, pos).unwrap();
        l.flatten_all().unwrap().to_vec1().unwrap()
    };
    let mut hidden = |p: &[u32]| -> Tensor {
        base.clear_kv_cache();
        let input = Tensor::new(p, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        base.forward(&input, 0, None).unwrap().squeeze(0).unwrap()
    };
    check_against_reference(&model, &mut step, Some(&mut hidden));
}

#[test]
fn qwen3_continuous_batch_matches_candle_transformers() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), QWEN3_CONFIG, 12, None);
    let model = LlmModel::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert!(model.config().qk_norm && model.config().head_dim == 32);
    let rcfg: qwen3::Config = serde_json::from_str(QWEN3_CONFIG).unwrap();
    let mut reference = qwen3::ModelForCausalLM::new(&rcfg, ref_vb(dir.path())).unwrap();
    let mut base = qwen3::Model::new(&rcfg, ref_vb(dir.path())).unwrap();
    let mut step = |t: &[u32], pos: usize| -> Vec<f32> {
        if pos == 0 {
            reference.clear_kv_cache();
        }
        let input = Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let l = reference.forward(&input, pos).unwrap();
        l.flatten_all().unwrap().to_vec1().unwrap()
    };
    // qwen3::Model has no public cache reset: build a fresh one per prompt.
    let dir_path = dir.path().to_path_buf();
    let mut hidden = |p: &[u32]| -> Tensor {
        base = qwen3::Model::new(&rcfg, ref_vb(&dir_path)).unwrap();
        let input = Tensor::new(p, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        base.forward(&input, 0).unwrap().squeeze(0).unwrap()
    };
    check_against_reference(&model, &mut step, Some(&mut hidden));
}

#[test]
fn llama3_continuous_batch_matches_candle_transformers() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), LLAMA_CONFIG, 13, None);
    let model = LlmModel::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert!(model.config().rope_scaling.is_some());
    let rcfg: llama::LlamaConfig = serde_json::from_str(LLAMA_CONFIG).unwrap();
    let rcfg = rcfg.into_config(false);
    let reference = llama::Llama::load(ref_vb(dir.path()), &rcfg).unwrap();
    let mut cache = llama::Cache::new(true, DType::F32, &rcfg, &Device::Cpu).unwrap();
    let mut step = |t: &[u32], pos: usize| -> Vec<f32> {
        if pos == 0 {
            cache = llama::Cache::new(true, DType::F32, &rcfg, &Device::Cpu).unwrap();
        }
        let input = Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        // Returns [1, vocab] f32.
        let l = reference.forward(&input, pos, &mut cache).unwrap();
        l.flatten_all().unwrap().to_vec1().unwrap()
    };
    check_against_reference(&model, &mut step, None);
}

#[test]
fn half_precision_loads_and_tracks_f32() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), QWEN3_CONFIG, 12, None);
    let f32_model = LlmModel::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let model = LlmModel::load(dir.path(), dtype, &Device::Cpu).unwrap();
        let prompts = prompts();
        let (mut a, mut b) = (model.new_cache(), model.new_cache());
        let (mut fa, mut fb) = (f32_model.new_cache(), f32_model.new_cache());
        let mut feed = [prompts[3].clone(), prompts[1].clone()];
        for _ in 0..4 {
            let mut chunks = [
                SeqChunk {
                    tokens: &feed[0],
                    cache: &mut a,
                    want_hidden: true,
                },
                SeqChunk {
                    tokens: &feed[1],
                    cache: &mut b,
                    want_hidden: false,
                },
            ];
            let out = model.forward(&mut chunks).unwrap();
            let mut chunks = [
                SeqChunk {
                    tokens: &feed[0],
                    cache: &mut fa,
                    want_hidden: false,
                },
                SeqChunk {
                    tokens: &feed[1],
                    cache: &mut fb,
                    want_hidden: false,
                },
            ];
            let reference = f32_model.forward(&mut chunks).unwrap();
            assert_eq!(out.logits.dtype(), DType::F32);
            assert_eq!(out.hidden[0].as_ref().unwrap().dtype(), DType::F32);
            let l: Vec<Vec<f32>> = out.logits.to_vec2().unwrap();
            let r: Vec<Vec<f32>> = reference.logits.to_vec2().unwrap();
            for (x, y) in l.iter().zip(&r) {
                assert!(x.iter().all(|v| v.is_finite()));
                let diff = max_abs_diff(x, y);
                assert!(diff < 0.25, "{dtype:?} logits drift {diff} from f32");
            }
            // Continue both from the f32 model's greedy tokens so the inputs stay identical.
            feed = [vec![argmax(&r[0])], vec![argmax(&r[1])]];
        }
        assert_eq!(a.len(), prompts[3].len() + 3);
        assert!(a.bytes() > 0 && a.bytes() * 2 == fa.bytes());
    }
}

#[test]
fn bad_checkpoints_and_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = "model.layers.1.self_attn.k_proj.bias";
    write_checkpoint(dir.path(), QWEN2_CONFIG, 11, Some(missing));
    match LlmModel::load(dir.path(), DType::F32, &Device::Cpu) {
        Err(LlmError::Weights(WeightsError::MissingTensor { name })) => assert_eq!(name, missing),
        other => panic!("expected a missing-tensor error, got {other:?}"),
    }
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    match LlmModel::load(dir.path(), DType::F32, &Device::Cpu) {
        Err(LlmError::Weights(WeightsError::NotFound { .. })) => {}
        other => panic!("expected not-found, got {other:?}"),
    }

    write_checkpoint(dir.path(), QWEN2_CONFIG, 11, None);
    let model = LlmModel::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let mut cache = model.new_cache();
    let err = model
        .forward(&mut [SeqChunk {
            tokens: &[1, 300],
            cache: &mut cache,
            want_hidden: false,
        }])
        .unwrap_err();
    assert!(matches!(err, LlmError::Input(_)), "{err}");
    assert!(cache.is_empty());
    let err = model
        .forward(&mut [SeqChunk {
            tokens: &[],
            cache: &mut cache,
            want_hidden: false,
        }])
        .unwrap_err();
    assert!(matches!(err, LlmError::Input(_)), "{err}");
}

#[test]
fn forked_and_truncated_caches_continue_correctly() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), QWEN2_CONFIG, 11, None);
    let model = LlmModel::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let prompt = &prompts()[3];
    let mut a = model.new_cache();
    model
        .forward(&mut [SeqChunk {
            tokens: &prompt[..10],
            cache: &mut a,
            want_hidden: false,
        }])
        .unwrap();
    let mut b = a.try_clone().unwrap();
    let mut c = model.new_cache();
    // `a` continues with the rest of the prompt; `b` takes a detour, then truncates back.
    let out_a = model
        .forward(&mut [SeqChunk {
            tokens: &prompt[10..],
            cache: &mut a,
            want_hidden: false,
        }])
        .unwrap();
    model
        .forward(&mut [SeqChunk {
            tokens: &[5, 6, 7],
            cache: &mut b,
            want_hidden: false,
        }])
        .unwrap();
    b.truncate(10);
    let out_b = model
        .forward(&mut [SeqChunk {
            tokens: &prompt[10..],
            cache: &mut b,
            want_hidden: false,
        }])
        .unwrap();
    let out_c = model
        .forward(&mut [SeqChunk {
            tokens: prompt,
            cache: &mut c,
            want_hidden: false,
        }])
        .unwrap();
    let la: Vec<f32> = out_a.logits.i(0).unwrap().to_vec1().unwrap();
    let lb: Vec<f32> = out_b.logits.i(0).unwrap().to_vec1().unwrap();
    let lc: Vec<f32> = out_c.logits.i(0).unwrap().to_vec1().unwrap();
    assert!(max_abs_diff(&la, &lb) < TOL);
    assert!(max_abs_diff(&la, &lc) < TOL);
    assert_eq!((a.len(), b.len(), c.len()), (20, 20, 20));
}
