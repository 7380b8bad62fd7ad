//! Loading valid deployment files: defaults, path resolution, environment overrides, graph
//! queries, rendering, and the example files shipped in `deploy/`.

use omnistage_stages::deploy::{
    ConnectorKind, DType, DeployError, DeployGraph, DeviceSpec, StageKind, StreamSpec,
};
use omnistage_stages::{Modality, PayloadKind};
use std::path::{Path, PathBuf};

const FILE: &str = "deploy/omni.toml";

const OMNI: &str = r#"
name = "omni"

[[stage]]
id = "thinker"
kind = "llm"
model = "models/thinker"
dtype = "bf16"
device = "cuda:0"
max_batch_size = 16
max_model_len = 4096
outputs = ["text", "hidden"]
[stage.sampling]
temperature = 0.7
max_tokens = 256
stop = ["</s>"]

[[stage]]
id = "talker-v2"
kind = "llm"
model = "/abs/talker"
replicas = 2
outputs = ["codes"]
[stage.talker]
codec_token_offset = 10
codebook_size = 64
frame_layout = [0, 1, 2, 2, 1, 2, 2]
end_token_ids = [2]
voices = { default = "", tara = "tara" }

[[stage]]
id = "code2wav"
kind = "codec"
model = "models/snac"
process = true

[[edge]]
from = "thinker"
to = "talker-v2"
carries = "hidden"
stream = { chunk = 1 }

[[edge]]
from = "talker-v2"
to = "code2wav"
carries = "codes"
connector = "shm"
stream = { chunk = 28 }

[outputs]
audio = "code2wav"
text = "thinker"
"#;

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn parse_env(env: &[(&str, &str)]) -> Result<DeployGraph, DeployError> {
    DeployGraph::from_toml_str(OMNI, Path::new(FILE), Path::new("/srv/deploy"), &vars(env))
}

fn parse() -> DeployGraph {
    parse_env(&[]).unwrap()
}

#[test]
fn full_graph_loads_with_defaults() {
    let g = parse();
    assert_eq!(g.name, "omni");
    assert_eq!(g.source, PathBuf::from(FILE));
    assert_eq!(g.stages.len(), 3);

    let t = g.stage("thinker").unwrap();
    assert_eq!(t.kind, StageKind::Llm);
    assert_eq!(t.dtype, DType::Bf16);
    assert_eq!(t.device, DeviceSpec::Cuda(0));
    assert_eq!(
        (t.replicas, t.max_batch_size, t.max_batched_tokens),
        (1, 16, 2048)
    );
    assert_eq!(
        (t.max_wait_ms, t.max_queue, t.max_model_len),
        (0, 256, Some(4096))
    );
    assert_eq!(t.outputs, vec![PayloadKind::Text, PayloadKind::Hidden]);
    assert_eq!(t.sampling.temperature, Some(0.7));
    assert_eq!(t.sampling.max_tokens, Some(256));
    assert_eq!(t.sampling.stop, vec!["</s>".to_string()]);
    assert_eq!(t.sampling.top_p, None);
    assert!(!t.process);

    let w = g.stage("code2wav").unwrap();
    assert_eq!(
        (w.dtype, w.device, w.max_batch_size, w.max_queue),
        (DType::F32, DeviceSpec::Cpu, 32, 256)
    );
    assert_eq!(w.outputs, vec![PayloadKind::Pcm]);
    assert!(w.process);
    assert_eq!(g.stage("talker-v2").unwrap().replicas, 2);

    assert_eq!(g.edges[0].connector, ConnectorKind::Inproc);
    assert_eq!(
        g.edges[0].stream,
        Some(StreamSpec {
            chunk: 1,
            buffer: StreamSpec::DEFAULT_BUFFER
        })
    );
    assert_eq!(g.edges[1].connector, ConnectorKind::Shm);
    assert_eq!(g.edges[1].carries, PayloadKind::Codes);
    assert_eq!(
        g.edges[1].stream,
        Some(StreamSpec {
            chunk: 28,
            buffer: StreamSpec::DEFAULT_BUFFER
        })
    );

    // Stable order: text before audio, whatever the file says.
    assert_eq!(
        g.outputs,
        vec![
            (Modality::Text, "thinker".to_string()),
            (Modality::Audio, "code2wav".to_string())
        ]
    );
}

#[test]
fn kind_defaults_for_outputs_and_name_from_file() {
    let text = "[[stage]]\nid = \"lm\"\nkind = \"llm\"\nmodel = \"m\"\n[outputs]\ntext = \"lm\"\n";
    let g = DeployGraph::from_toml_str(text, Path::new("deploy/solo.toml"), Path::new("."), &[])
        .unwrap();
    assert_eq!(g.name, "solo");
    let lm = g.stage("lm").unwrap();
    assert_eq!(
        lm.outputs,
        vec![PayloadKind::Text, PayloadKind::Tokens, PayloadKind::Hidden]
    );
    assert_eq!(
        StageKind::Encoder.default_outputs(),
        vec![PayloadKind::Embeddings, PayloadKind::Hidden]
    );
    assert_eq!(
        StageKind::Router.default_outputs(),
        vec![PayloadKind::Route]
    );
}

#[test]
fn relative_model_paths_resolve_against_the_base_dir() {
    let g = parse();
    assert_eq!(
        g.stage("thinker").unwrap().model,
        PathBuf::from("/srv/deploy/models/thinker")
    );
    assert_eq!(
        g.stage("talker-v2").unwrap().model,
        PathBuf::from("/abs/talker")
    );
}

#[test]
fn graph_queries() {
    let g = parse();
    let entry: Vec<&str> = g.entry_stages().iter().map(|s| s.id.as_str()).collect();
    assert_eq!(entry, vec!["thinker"]);
    let inbound: Vec<&str> = g.inbound("talker-v2").map(|e| e.from.as_str()).collect();
    assert_eq!(inbound, vec!["thinker"]);
    let outbound: Vec<&str> = g.outbound("talker-v2").map(|e| e.to.as_str()).collect();
    assert_eq!(outbound, vec!["code2wav"]);
    assert_eq!(g.outbound("code2wav").count(), 0);
    assert_eq!(
        g.output_stage(Modality::Audio).map(|s| s.id.as_str()),
        Some("code2wav")
    );
    assert_eq!(
        g.output_stage(Modality::Text).map(|s| s.id.as_str()),
        Some("thinker")
    );
    assert!(g.output_stage(Modality::Image).is_none());
    assert!(g.stage("nope").is_none());
}

#[test]
fn env_overrides_stage_fields_sampling_and_name() {
    let g = parse_env(&[
        ("OMNISTAGE_NAME", "omni-prod"),
        ("OMNISTAGE_STAGE__THINKER__MAX_BATCH_SIZE", "8"),
        ("OMNISTAGE_STAGE__THINKER__DEVICE", "cuda:1"),
        ("OMNISTAGE_STAGE__THINKER__SAMPLING__TEMPERATURE", "0"),
        ("OMNISTAGE_STAGE__THINKER__SAMPLING__TOP_P", "0.9"),
        ("OMNISTAGE_STAGE__THINKER__SAMPLING__STOP_TOKEN_IDS", "1, 2"),
        ("OMNISTAGE_STAGE__TALKER_V2__PROCESS", "true"),
        ("omnistage_stage__talker_v2__outputs", "codes,text"),
        ("OMNISTAGE_STAGE__TALKER_V2__TALKER__CODEBOOK_SIZE", "32"),
        ("OMNISTAGE_STAGE__CODE2WAV__SAMPLING__STOP", "a,b"),
        ("OMNISTAGE_STAGE__CODE2WAV__MAX_WAIT_MS", "5"),
        ("OMNISTAGE_LOG", "debug"),
        ("PATH", "/usr/bin"),
    ])
    .unwrap();
    assert_eq!(g.name, "omni-prod");
    let t = g.stage("thinker").unwrap();
    assert_eq!(t.max_batch_size, 8);
    assert_eq!(t.device, DeviceSpec::Cuda(1));
    assert_eq!(t.sampling.temperature, Some(0.0));
    assert_eq!(t.sampling.top_p, Some(0.9));
    assert_eq!(
        t.sampling.max_tokens,
        Some(256),
        "untouched sampling fields stay"
    );
    assert_eq!(t.sampling.stop_token_ids, vec![1, 2]);
    assert_eq!(t.max_batched_tokens, 2048, "untouched fields stay");
    let tv = g.stage("talker-v2").unwrap();
    assert!(tv.process);
    assert_eq!(tv.outputs, vec![PayloadKind::Codes, PayloadKind::Text]);
    assert_eq!(tv.talker.as_ref().map(|t| t.codebook_size), Some(32));
    let w = g.stage("code2wav").unwrap();
    assert_eq!(w.sampling.stop, vec!["a,b".to_string()]);
    assert_eq!(w.max_wait_ms, 5);
}

#[test]
fn env_override_creates_missing_sampling_table() {
    let g = parse_env(&[("OMNISTAGE_STAGE__TALKER_V2__SAMPLING__TEMPERATURE", "1.5")]).unwrap();
    assert_eq!(
        g.stage("talker-v2").unwrap().sampling.temperature,
        Some(1.5)
    );
}

#[test]
fn env_override_errors_name_the_variable() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "OMNISTAGE_STAGE__VOCODER__MAX_QUEUE",
            "4",
            &["no stage matches `vocoder`", "`thinker`"],
        ),
        (
            "OMNISTAGE_STAGE__THINKER__MAX_BATCH_SISE",
            "4",
            &["stage `thinker`", "field `max_batch_sise`"],
        ),
        (
            "OMNISTAGE_STAGE__THINKER__SAMPLING__TEMPRATURE",
            "1",
            &["stage `thinker`", "sampling.temprature"],
        ),
        ("OMNISTAGE_STAGE__THINKER__ID", "x", &["field `id`"]),
        (
            "OMNISTAGE_STAGE__THINKER__MAX_BATCH_SIZE",
            "eight",
            &["non-negative integer", "`eight`"],
        ),
        (
            "OMNISTAGE_STAGE__THINKER__PROCESS",
            "maybe",
            &["true or false"],
        ),
        (
            "OMNISTAGE_STAGE__THINKER__SAMPLING__TEMPERATURE",
            "hot",
            &["a number"],
        ),
        (
            "OMNISTAGE_STAGES__THINKER__REPLICAS",
            "2",
            &["unknown deployment override"],
        ),
        (
            "OMNISTAGE_STAGE__THINKER",
            "2",
            &["unknown deployment override"],
        ),
    ];
    for (var, value, parts) in cases {
        let e = parse_env(&[(var, value)]).expect_err(var);
        assert!(matches!(e, DeployError::Override { .. }), "{var}: {e:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("{FILE}: environment variable `{var}`")),
            "{msg}"
        );
        for p in *parts {
            assert!(msg.contains(p), "`{p}` missing in: {msg}");
        }
    }
}

#[test]
fn env_overrides_are_validated_like_the_file() {
    let e = parse_env(&[("OMNISTAGE_STAGE__THINKER__MAX_BATCH_SIZE", "0")]).unwrap_err();
    assert!(matches!(e, DeployError::OutOfRange { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("stage `thinker`, field `max_batch_size`"),
        "{e}"
    );
    let e = parse_env(&[("OMNISTAGE_STAGE__THINKER__DEVICE", "gpu")]).unwrap_err();
    assert!(matches!(e, DeployError::UnknownDevice { .. }), "{e:?}");
}

#[test]
fn to_dot_has_nodes_edges_and_output_sinks() {
    let dot = parse().to_dot();
    assert!(dot.starts_with("digraph \"omni\" {"), "{dot}");
    assert!(
        dot.contains("\"thinker\" [label=\"thinker\\nllm\"]"),
        "{dot}"
    );
    assert!(
        dot.contains("\"code2wav\" [label=\"code2wav\\ncodec\"]"),
        "{dot}"
    );
    assert!(
        dot.contains("\"thinker\" -> \"talker-v2\" [label=\"hidden\\ninproc, stream chunk=1\"]"),
        "{dot}"
    );
    assert!(
        dot.contains("\"talker-v2\" -> \"code2wav\" [label=\"codes\\nshm, stream chunk=28\"]"),
        "{dot}"
    );
    assert!(dot.contains("\"output:audio\" [shape=ellipse"), "{dot}");
    assert!(dot.contains("\"code2wav\" -> \"output:audio\""), "{dot}");
    assert!(dot.contains("\"thinker\" -> \"output:text\""), "{dot}");
    assert!(dot.trim_end().ends_with('}'));
}

#[test]
fn to_text_mentions_every_stage_edge_and_output() {
    let g = parse();
    let text = g.to_text();
    for s in &g.stages {
        assert!(text.contains(&format!("{} ({})", s.id, s.kind)), "{text}");
    }
    for p in [
        "deployment `omni`",
        "device:   cuda:0  dtype: bf16",
        "max_batch_size=16",
        "max_model_len=4096",
        "temperature=0.7",
        "thinker (llm)  [entry]",
        "#2 talker-v2 -> code2wav  carries=codes connector=shm stream chunk=28 buffer=8",
        "voices:   default, tara",
        "text <- thinker",
        "audio <- code2wav",
    ] {
        assert!(text.contains(p), "`{p}` missing in:\n{text}");
    }
}

#[test]
fn load_reads_a_file_and_resolves_against_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("omni.toml");
    std::fs::write(&path, OMNI).unwrap();
    let g = DeployGraph::load(&path).unwrap();
    assert_eq!(g.source, path);
    assert_eq!(
        g.stage("code2wav").unwrap().model,
        dir.path().join("models/snac")
    );
}

fn shipped(name: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    (path, text)
}

#[test]
fn shipped_deployment_files_parse() {
    let (path, text) = shipped("tiny-omni.toml");
    let g = DeployGraph::from_toml_str(&text, &path, Path::new("/cache"), &[]).unwrap();
    assert_eq!(g.name, "tiny-omni");
    let t = g.stage("thinker").unwrap();
    assert_eq!(
        (t.kind, t.dtype, t.device),
        (StageKind::Llm, DType::F32, DeviceSpec::Cpu)
    );
    assert_eq!(
        (t.max_batch_size, t.max_batched_tokens, t.max_queue),
        (64, 2048, 512)
    );
    assert_eq!(t.model, PathBuf::from("/cache/tiny-omni/thinker"));
    assert_eq!(
        (
            t.sampling.temperature,
            t.sampling.top_p,
            t.sampling.max_tokens
        ),
        (Some(0.7), Some(0.95), Some(128))
    );
    assert_eq!(
        g.output_stage(Modality::Text).map(|s| s.id.as_str()),
        Some("thinker")
    );

    let talker = g.stage("talker").unwrap();
    assert_eq!(
        talker.outputs,
        vec![PayloadKind::Tokens, PayloadKind::Codes]
    );
    assert_eq!(
        g.output_stage(Modality::Audio).map(|s| s.id.as_str()),
        Some("codec")
    );

    for name in ["tiny-omni.toml", "tiny-image.toml"] {
        let (path, text) = shipped(name);
        let g = DeployGraph::from_toml_str(&text, &path, Path::new("/cache"), &[]).unwrap();
        let dit = g.stage("dit").unwrap();
        assert_eq!(dit.kind, StageKind::Dit);
        assert_eq!(dit.model, PathBuf::from("/cache/tiny-omni/image"));
        assert_eq!(
            (
                dit.image.default_width,
                dit.image.max_size,
                dit.image.default_steps
            ),
            (64, 256, 8)
        );
        assert_eq!(g.stage("image-encoder").unwrap().image.max_text_tokens, 16);
        assert_eq!(
            g.output_stage(Modality::Image).map(|s| s.id.as_str()),
            Some("vae")
        );
    }

    let (path, text) = shipped("orpheus-tts.toml");
    let g = DeployGraph::from_toml_str(&text, &path, Path::new("/x"), &[]).unwrap();
    let talker = g.stage("talker").unwrap().talker.as_ref().unwrap();
    assert_eq!(talker.canonical_slots(), vec![0, 1, 3, 4, 2, 5, 6]);
    assert_eq!(talker.voices["default"], "tara");
    assert_eq!(g.edges[0].carries, PayloadKind::Codes);
    assert_eq!(g.edges[0].stream.map(|s| s.chunk), Some(4));
    assert_eq!(
        g.output_stage(Modality::Audio).map(|s| s.id.as_str()),
        Some("codec")
    );

    let (path, text) = shipped("qwen2.5-0.5b.toml");
    let base = path.parent().unwrap();
    let g = DeployGraph::from_toml_str(&text, &path, base, &[]).unwrap();
    let q = &g.stages[0];
    assert_eq!((q.kind, q.dtype), (StageKind::Llm, DType::Bf16));
    assert!(
        q.model.ends_with("models/Qwen2.5-0.5B-Instruct"),
        "{}",
        q.model.display()
    );
    assert_eq!(
        g.output_stage(Modality::Text).map(|s| s.id.as_str()),
        Some(q.id.as_str())
    );
}

#[test]
fn kv_cache_settings_parse_with_units_and_name_the_field_when_wrong() {
    let base = "name = \"g\"\n[[stage]]\nid = \"thinker\"\nkind = \"llm\"\nmodel = \"m\"\n";
    let ok = format!("{base}kv_cache_bytes = \"256MiB\"\nkv_block_size = 32\nprefix_caching = false\n[outputs]\ntext = \"thinker\"\n");
    let g = DeployGraph::from_toml_str(&ok, Path::new(FILE), Path::new("/base"), &[]).unwrap();
    let s = g.stage("thinker").unwrap();
    assert_eq!(s.kv_cache_bytes, Some(256 << 20));
    assert_eq!(s.kv_block_size, 32);
    assert!(!s.prefix_caching);
    assert!(g.to_text().contains("blocks of 32 tokens"));
    let defaults = format!("{base}[outputs]\ntext = \"thinker\"\n");
    let g =
        DeployGraph::from_toml_str(&defaults, Path::new(FILE), Path::new("/base"), &[]).unwrap();
    let s = g.stage("thinker").unwrap();
    assert_eq!(
        (s.kv_cache_bytes, s.kv_block_size, s.prefix_caching),
        (None, 16, true)
    );
    let env = [(
        "OMNISTAGE_STAGE__THINKER__KV_CACHE_BYTES".to_string(),
        "1GiB".to_string(),
    )];
    let g =
        DeployGraph::from_toml_str(&defaults, Path::new(FILE), Path::new("/base"), &env).unwrap();
    assert_eq!(g.stage("thinker").unwrap().kv_cache_bytes, Some(1 << 30));
    let bad = format!("{base}kv_cache_bytes = \"12 parsecs\"\n[outputs]\ntext = \"thinker\"\n");
    let err = DeployGraph::from_toml_str(&bad, Path::new(FILE), Path::new("/base"), &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(FILE) && err.contains("thinker") && err.contains("kv_cache_bytes"),
        "{err}"
    );
}
