//! The Mixture of Thoughts reference forward (`omnistage_engines::mot`) on the tiny MoT set:
//! wiring (α = 0 and K = 1 reduce to the plain expert), collaboration with peers (different,
//! finite, deterministic, peer-order invariant, causal), one interaction layer against a
//! hand computation, resampling, and the checkpoint round trip and its errors.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use omnistage_engines::llm::model::{LlmModel, SeqChunk};
use omnistage_engines::mot::{
    resample_tokens, ExpertInput, Interaction, InteractionSpec, MotConfig, MotError, MotModel,
    INTERACTION_FILE, MOT_CONFIG_FILE,
};
use omnistage_engines::tiny::{write_mot, TINY_MOT_EXPERTS, TINY_MOT_SHARED_DIM, TINY_MOT_STACKS};
use rand::{rngs::StdRng, Rng, SeedableRng};

const TOL: f32 = 1e-5;
const PROMPT: [u32; 8] = [5, 17, 300, 42, 99, 7, 256, 128];

fn tiny_set(seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_mot(dir.path(), seed).unwrap();
    dir
}

/// Rewrites `mot_config.json` with `change` applied.
fn patch_config(dir: &Path, change: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join(MOT_CONFIG_FILE);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    change(&mut v);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
}

fn load(dir: &Path) -> MotModel {
    MotModel::load(dir, &Device::Cpu).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

/// The plain expert's logits at every position: one cache-less forward per prefix.
fn plain_logits(model: &LlmModel, tokens: &[u32]) -> Vec<Vec<f32>> {
    (1..=tokens.len())
        .map(|t| {
            let mut cache = model.new_cache();
            let out = model
                .forward(&mut [SeqChunk {
                    tokens: &tokens[..t],
                    cache: &mut cache,
                    want_hidden: false,
                }])
                .unwrap();
            out.logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap()
        })
        .collect()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(u, v)| (u - v).abs())
        })
        .fold(0.0, f32::max)
}

fn all_experts(tokens: &[u32]) -> Vec<ExpertInput<'_>> {
    (0..TINY_MOT_EXPERTS.len())
        .map(|expert| ExpertInput { expert, tokens })
        .collect()
}

#[test]
fn alpha_zero_is_the_plain_expert() {
    let dir = tiny_set(3);
    patch_config(dir.path(), |v| v["alpha"] = 0.0.into());
    let mot = load(dir.path());
    for primary in 0..3 {
        let got = rows(&mot.forward(&all_experts(&PROMPT), primary).unwrap());
        let want = plain_logits(mot.expert(primary).unwrap(), &PROMPT);
        let d = max_diff(&got, &want);
        assert!(d <= TOL, "primary {primary}: max diff {d}");
    }
}

#[test]
fn single_expert_is_the_plain_expert() {
    let dir = tiny_set(4);
    let mot = load(dir.path());
    for primary in 0..3 {
        let inputs = [ExpertInput {
            expert: primary,
            tokens: &PROMPT,
        }];
        let got = rows(&mot.forward(&inputs, primary).unwrap());
        let want = plain_logits(mot.expert(primary).unwrap(), &PROMPT);
        let d = max_diff(&got, &want);
        assert!(d <= TOL, "primary {primary}: max diff {d}");
    }
}

#[test]
fn peers_change_logits_deterministically_and_order_free() {
    let dir = tiny_set(5);
    let mot = load(dir.path());
    let primary = 2;
    let inputs = all_experts(&PROMPT);
    let a = rows(&mot.forward(&inputs, primary).unwrap());
    let b = rows(&mot.forward(&inputs, primary).unwrap());
    assert_eq!(a, b, "two runs differ");
    assert!(a.iter().flatten().all(|x| x.is_finite()));
    let plain = plain_logits(mot.expert(primary).unwrap(), &PROMPT);
    let d = max_diff(&a, &plain);
    assert!(d > 1e-3, "peers changed the logits by only {d}");

    for order in [[2, 1, 0], [1, 2, 0], [0, 2, 1]] {
        let inputs: Vec<_> = order
            .iter()
            .map(|&expert| ExpertInput {
                expert,
                tokens: &PROMPT,
            })
            .collect();
        let c = rows(&mot.forward(&inputs, primary).unwrap());
        let d = max_diff(&a, &c);
        assert!(d <= TOL, "order {order:?}: max diff {d}");
    }

    // One peer only: still different from both the plain expert and the two-peer result.
    let two = [
        ExpertInput {
            expert: 0,
            tokens: &PROMPT,
        },
        ExpertInput {
            expert: 2,
            tokens: &PROMPT,
        },
    ];
    let c = rows(&mot.forward(&two, primary).unwrap());
    assert!(max_diff(&c, &plain) > 1e-3 && max_diff(&c, &a) > 1e-3);
}

#[test]
fn cross_attention_is_causal() {
    // The first rows of a longer prompt's logits are the shorter prompt's logits.
    let dir = tiny_set(6);
    let mot = load(dir.path());
    let full = rows(&mot.forward(&all_experts(&PROMPT), 1).unwrap());
    let short = rows(&mot.forward(&all_experts(&PROMPT[..5]), 1).unwrap());
    let d = max_diff(&full[..5], &short);
    assert!(d <= TOL, "max diff {d}");
}

#[test]
fn peers_with_other_token_counts_are_resampled() {
    let dir = tiny_set(7);
    let mot = load(dir.path());
    let inputs = [
        ExpertInput {
            expert: 0,
            tokens: &PROMPT,
        },
        ExpertInput {
            expert: 1,
            tokens: &PROMPT[..5],
        },
        ExpertInput {
            expert: 2,
            tokens: &[9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11],
        },
    ];
    let out = mot.forward(&inputs, 0).unwrap();
    assert_eq!(out.dims(), &[PROMPT.len(), 512]);
    assert!(rows(&out).iter().flatten().all(|x| x.is_finite()));
}

#[test]
fn resampling_interpolates_along_tokens() {
    let s = Tensor::new(&[[0f32, 10.], [1., 20.], [3., 40.]], &Device::Cpu).unwrap();
    assert_eq!(rows(&resample_tokens(&s, 3).unwrap()), rows(&s));
    let up = rows(&resample_tokens(&s, 5).unwrap());
    let want = [[0., 10.], [0.5, 15.], [1., 20.], [2., 30.], [3., 40.]];
    for (g, w) in up.iter().zip(want) {
        assert!(
            (g[0] - w[0]).abs() < 1e-6 && (g[1] - w[1]).abs() < 1e-6,
            "{up:?}"
        );
    }
    let down = rows(&resample_tokens(&s, 2).unwrap());
    assert_eq!(down, vec![vec![0., 10.], vec![3., 40.]]);
    assert_eq!(rows(&resample_tokens(&s, 1).unwrap()), vec![vec![3., 40.]]);
    assert!(resample_tokens(&s, 0).is_err());
}

// ---- One interaction layer by hand ----------------------------------------------------------

type Mat = Vec<Vec<f32>>;

fn linear(x: &Mat, w: &Mat, b: &[f32]) -> Mat {
    x.iter()
        .map(|r| {
            w.iter()
                .zip(b)
                .map(|(wr, bi)| r.iter().zip(wr).map(|(a, c)| a * c).sum::<f32>() + bi)
                .collect()
        })
        .collect()
}

fn layer_norm(x: &Mat, w: &[f32], b: &[f32], eps: f32) -> Mat {
    x.iter()
        .map(|r| {
            let n = r.len() as f32;
            let mean = r.iter().sum::<f32>() / n;
            let var = r.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n;
            r.iter()
                .zip(w.iter().zip(b))
                .map(|(v, (wi, bi))| (v - mean) / (var + eps).sqrt() * wi + bi)
                .collect()
        })
        .collect()
}

struct Hand {
    t: HashMap<String, Tensor>,
    rng: StdRng,
}

impl Hand {
    fn put(&mut self, name: &str, shape: &[usize]) {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.rng.gen_range(-1.0..1.0)).collect();
        let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
        self.t.insert(name.to_string(), t);
    }
    fn mat(&self, name: &str) -> Mat {
        self.t[name].to_vec2().unwrap()
    }
    fn vec(&self, name: &str) -> Vec<f32> {
        self.t[name].to_vec1().unwrap()
    }
}

#[test]
fn one_interaction_layer_by_hand() {
    let (ds, heads, alpha, eps) = (4usize, 2usize, 0.7f32, 1e-5f32);
    let dims = [3usize, 5, 2];
    let mut h = Hand {
        t: HashMap::new(),
        rng: StdRng::seed_from_u64(11),
    };
    for (i, &d) in dims.iter().enumerate() {
        let p = format!("stacks.0.experts.{i}");
        h.put(&format!("{p}.norm.weight"), &[d]);
        h.put(&format!("{p}.norm.bias"), &[d]);
        h.put(&format!("{p}.in_proj.weight"), &[ds, d]);
        h.put(&format!("{p}.in_proj.bias"), &[ds]);
        h.put(&format!("{p}.out_proj.weight"), &[d, ds]);
        h.put(&format!("{p}.out_proj.bias"), &[d]);
    }
    for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        h.put(&format!("stacks.0.attn.{proj}.weight"), &[ds, ds]);
        h.put(&format!("stacks.0.attn.{proj}.bias"), &[ds]);
    }
    let spec = InteractionSpec {
        shared_dim: ds,
        num_heads: heads,
        num_stacks: 1,
        alpha: alpha as f64,
        layer_norm_eps: eps as f64,
        expert_dims: dims.to_vec(),
    };
    let vb = VarBuilder::from_tensors(h.t.clone(), DType::F32, &Device::Cpu);
    let inter = Interaction::new(spec, vb).unwrap();

    let t = 3;
    let hidden: Vec<Mat> = dims
        .iter()
        .map(|&d| {
            (0..t)
                .map(|_| (0..d).map(|_| h.rng.gen_range(-2.0..2.0)).collect())
                .collect()
        })
        .collect();
    let tensor = |m: &Mat| Tensor::new(m.clone(), &Device::Cpu).unwrap();

    // By hand: S_m = LN(H_m) W_inᵀ + b_in for every expert.
    let s: Vec<Mat> = (0..3)
        .map(|i| {
            let p = format!("stacks.0.experts.{i}");
            let ln = layer_norm(
                &hidden[i],
                &h.vec(&format!("{p}.norm.weight")),
                &h.vec(&format!("{p}.norm.bias")),
                eps,
            );
            linear(
                &ln,
                &h.mat(&format!("{p}.in_proj.weight")),
                &h.vec(&format!("{p}.in_proj.bias")),
            )
        })
        .collect();
    let proj = |name: &str, x: &Mat| {
        linear(
            x,
            &h.mat(&format!("stacks.0.attn.{name}.weight")),
            &h.vec(&format!("stacks.0.attn.{name}.bias")),
        )
    };
    let q = proj("q_proj", &s[0]);
    // Keys/values: peers 1 and 2, each row j tagged with its position.
    let mut kv_rows: Vec<(usize, Vec<f32>, Vec<f32>)> = Vec::new();
    for peer in [1, 2] {
        let (k, v) = (proj("k_proj", &s[peer]), proj("v_proj", &s[peer]));
        for j in 0..t {
            kv_rows.push((j, k[j].clone(), v[j].clone()));
        }
    }
    let dh = ds / heads;
    let mut ctx = vec![vec![0f32; ds]; t];
    for (i, ctx_row) in ctx.iter_mut().enumerate() {
        for hd in 0..heads {
            let r = hd * dh..(hd + 1) * dh;
            let scores: Vec<f32> = kv_rows
                .iter()
                .map(|(j, k, _)| {
                    if *j > i {
                        f32::NEG_INFINITY
                    } else {
                        q[i][r.clone()]
                            .iter()
                            .zip(&k[r.clone()])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            / (dh as f32).sqrt()
                    }
                })
                .collect();
            let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = scores.iter().map(|x| (x - m).exp()).collect();
            let z: f32 = e.iter().sum();
            for ((_, _, v), w) in kv_rows.iter().zip(&e) {
                for (c, x) in r.clone().zip(&v[r.clone()]) {
                    ctx_row[c] += w / z * x;
                }
            }
        }
    }
    let o = proj("o_proj", &ctx);
    let back = linear(
        &o,
        &h.mat("stacks.0.experts.0.out_proj.weight"),
        &h.vec("stacks.0.experts.0.out_proj.bias"),
    );
    let want: Mat = hidden[0]
        .iter()
        .zip(&back)
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x + alpha * y).collect())
        .collect();

    let peers: Vec<Tensor> = [1, 2]
        .iter()
        .map(|&i| inter.project_out(i, 0, &tensor(&hidden[i])).unwrap())
        .collect();
    assert!(max_diff(&rows(&peers[0]), &s[1]) <= TOL);
    let got = rows(&inter.interact(0, 0, &tensor(&hidden[0]), &peers).unwrap());
    let d = max_diff(&got, &want);
    assert!(d <= TOL, "max diff {d}: {got:?} vs {want:?}");

    // Decode form: the last token alone against the full peer states gives the last row.
    let last = tensor(&vec![hidden[0][t - 1].clone()]);
    let step = rows(&inter.interact_at(0, 0, &last, t - 1, &peers).unwrap());
    assert!(max_diff(&step, &want[t - 1..]) <= TOL);

    // Errors instead of panics on bad shapes and ids.
    assert!(matches!(
        inter.interact(0, 1, &tensor(&hidden[0]), &peers),
        Err(MotError::Input(_))
    ));
    assert!(matches!(
        inter.project_out(1, 0, &tensor(&hidden[0])),
        Err(MotError::Input(_))
    ));
    assert!(matches!(
        inter.interact_at(0, 0, &last, 0, &peers),
        Err(MotError::Input(_))
    ));
}

// ---- Checkpoint --------------------------------------------------------------------------

#[test]
fn tiny_checkpoint_round_trips() {
    let dir = tiny_set(8);
    let cfg = MotConfig::from_file(&dir.path().join(MOT_CONFIG_FILE)).unwrap();
    let names: Vec<_> = cfg.experts.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, TINY_MOT_EXPERTS);
    assert_eq!(cfg.shared_dim, TINY_MOT_SHARED_DIM);
    assert_eq!(cfg.num_stacks, TINY_MOT_STACKS);
    assert_eq!(
        cfg.expert_dir(dir.path(), 1),
        Some(dir.path().join("experts/medium"))
    );
    // Serializing and parsing again gives the same config.
    let again: MotConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(again, cfg);

    let mot = load(dir.path());
    assert_eq!(mot.config(), &cfg);
    let widths: Vec<_> = (0..3)
        .map(|i| mot.expert(i).unwrap().config().hidden_size)
        .collect();
    assert_eq!(widths, [32, 48, 64]);
    assert_eq!(mot.interaction().spec().expert_dims, widths);
    assert_eq!(mot.stack_layers(1, 0), 0..1);
    assert_eq!(mot.stack_layers(1, 1), 1..3);
    assert_eq!(mot.stack_layers(2, 1), 2..4);

    let tensors =
        candle_core::safetensors::load(dir.path().join(INTERACTION_FILE), &Device::Cpu).unwrap();
    let ds = TINY_MOT_SHARED_DIM;
    assert_eq!(tensors.len(), TINY_MOT_STACKS * (3 * 6 + 8));
    for q in 0..TINY_MOT_STACKS {
        for (i, d) in widths.iter().enumerate() {
            let p = format!("stacks.{q}.experts.{i}");
            assert_eq!(tensors[&format!("{p}.norm.weight")].dims(), &[*d]);
            assert_eq!(tensors[&format!("{p}.in_proj.weight")].dims(), &[ds, *d]);
            assert_eq!(tensors[&format!("{p}.out_proj.weight")].dims(), &[*d, ds]);
        }
        assert_eq!(
            tensors[&format!("stacks.{q}.attn.k_proj.weight")].dims(),
            &[ds, ds]
        );
    }

    // Same seed: same bytes.
    let other = tiny_set(8);
    for f in [
        MOT_CONFIG_FILE,
        INTERACTION_FILE,
        "experts/large/model.safetensors",
    ] {
        let a = std::fs::read(dir.path().join(f)).unwrap();
        assert_eq!(a, std::fs::read(other.path().join(f)).unwrap(), "{f}");
    }
}

#[test]
fn bad_checkpoints_give_clear_errors() {
    let dir = tiny_set(9);
    let path = dir.path().join(INTERACTION_FILE);
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors.remove("stacks.1.attn.v_proj.bias");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = MotModel::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(matches!(err, MotError::Weights { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("stacks.1.attn.v_proj.bias") && msg.contains(INTERACTION_FILE),
        "{msg}"
    );

    std::fs::remove_file(&path).unwrap();
    let err = MotModel::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains(INTERACTION_FILE), "{err}");

    patch_config(dir.path(), |v| v["num_heads"] = 5.into());
    let err = MotModel::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(matches!(err, MotError::Config { .. }), "{err}");

    patch_config(dir.path(), |v| {
        v["num_heads"] = 4.into();
        v["num_stacks"] = 3.into();
    });
    let err = MotModel::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("fewer than num_stacks"), "{err}");

    patch_config(dir.path(), |v| {
        v["num_stacks"] = 2.into();
        v["experts"][1]["path"] = "experts/nope".into();
    });
    let err = MotModel::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(matches!(err, MotError::Expert { .. }), "{err}");

    let good = tiny_set(9);
    let mot = load(good.path());
    let one = [ExpertInput {
        expert: 0,
        tokens: &PROMPT,
    }];
    assert!(matches!(mot.forward(&one, 1), Err(MotError::Input(_))));
    let twice = [one[0], one[0]];
    assert!(matches!(mot.forward(&twice, 0), Err(MotError::Input(_))));
    let bad_id = [ExpertInput {
        expert: 0,
        tokens: &[9999],
    }];
    assert!(matches!(mot.forward(&bad_id, 0), Err(MotError::Llm(_))));
}
