//! Every way a deployment file is refused before weights load; each error must name the file, the
//! stage (or edge) and the field.

use omnistage_stages::deploy::{DeployError, DeployGraph, DeviceSpec};
use std::path::Path;

const FILE: &str = "deploy/x.toml";

/// A valid three-stage graph: thinker (text + hidden) → talker (codes) → code2wav (pcm).
const OMNI: &str = r#"
name = "omni"

[[stage]]
id = "thinker"
kind = "llm"
model = "m/thinker"
outputs = ["text", "hidden"]

[[stage]]
id = "talker"
kind = "llm"
model = "m/talker"
outputs = ["codes", "tokens"]

[stage.talker]
codec_token_offset = 10
codebook_size = 64
frame_layout = [0, 1, 1]
end_token_ids = [2]

[[stage]]
id = "code2wav"
kind = "codec"
model = "m/snac"

[[edge]]
from = "thinker"
to = "talker"
carries = "hidden"

[[edge]]
from = "talker"
to = "code2wav"
carries = "codes"

[outputs]
text = "thinker"
audio = "code2wav"
"#;

fn parse(text: &str) -> Result<DeployGraph, DeployError> {
    DeployGraph::from_toml_str(text, Path::new(FILE), Path::new("/base"), &[])
}

/// Parses `text`, expects an error, and checks its message names the file and every `parts`.
fn refused(text: &str, parts: &[&str]) -> DeployError {
    let err = match parse(text) {
        Ok(g) => panic!("expected an error, got {g:?}"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("{FILE}: ")), "no file in: {msg}");
    for p in parts {
        assert!(msg.contains(p), "`{p}` missing in: {msg}");
    }
    err
}

/// OMNI with `from` replaced by `to` (exactly once).
fn omni_with(from: &str, to: &str) -> String {
    assert_eq!(OMNI.matches(from).count(), 1, "{from}");
    OMNI.replacen(from, to, 1)
}

#[test]
fn the_base_graph_is_valid() {
    parse(OMNI).unwrap();
}

#[test]
fn unknown_stage_field() {
    let text = omni_with(
        "id = \"talker\"\n",
        "id = \"talker\"\ninputs = [\"thinker.hidden\"]\n",
    );
    let e = refused(
        &text,
        &[
            "stage `talker`",
            "field `inputs`",
            "unknown field",
            "max_batch_size",
        ],
    );
    assert!(matches!(e, DeployError::UnknownField { .. }));
    let text = omni_with(
        "model = \"m/thinker\"\n",
        "model = \"m/thinker\"\nmax_batch_sise = 8\n",
    );
    refused(&text, &["stage `thinker`", "field `max_batch_sise`"]);
}

#[test]
fn unknown_fields_in_sampling_edge_stream_and_top_level() {
    let text = omni_with(
        "model = \"m/snac\"\n",
        "model = \"m/snac\"\n[stage.sampling]\ntemprature = 0.5\n",
    );
    refused(
        &text,
        &[
            "stage `code2wav`",
            "field `sampling.temprature`",
            "temperature",
        ],
    );
    let text = omni_with(
        "carries = \"codes\"\n",
        "carries = \"codes\"\nconector = \"shm\"\n",
    );
    refused(&text, &["edge #2 (talker -> code2wav)", "field `conector`"]);
    let text = omni_with(
        "carries = \"codes\"\n",
        "carries = \"codes\"\nstream = { chunks = 4 }\n",
    );
    refused(
        &text,
        &["edge #2 (talker -> code2wav)", "field `stream.chunks`"],
    );
    let e = refused(
        &format!("nmae = \"x\"\n{OMNI}"),
        &["top level", "field `nmae`"],
    );
    assert!(matches!(e, DeployError::UnknownField { .. }));
}

#[test]
fn missing_required_fields() {
    let e = refused(
        &omni_with("id = \"talker\"\n", ""),
        &["stage #2", "field `id`", "missing"],
    );
    assert!(matches!(e, DeployError::MissingField { .. }));
    refused(
        &omni_with("kind = \"codec\"\n", ""),
        &["stage `code2wav`", "field `kind`", "missing"],
    );
    refused(
        &omni_with("model = \"m/talker\"\n", ""),
        &["stage `talker`", "field `model`", "missing"],
    );
    refused(
        &omni_with("carries = \"hidden\"\n", ""),
        &["edge #1 (thinker -> talker)", "field `carries`", "missing"],
    );
    refused(
        &omni_with("to = \"code2wav\"\n", ""),
        &["edge #2 (talker -> ?)", "field `to`", "missing"],
    );
}

#[test]
fn bad_enum_values_list_the_allowed_ones() {
    let e = refused(
        &omni_with("kind = \"codec\"", "kind = \"transformer\""),
        &[
            "stage `code2wav`",
            "field `kind`",
            "`transformer`",
            "llm, dit, vae, codec, encoder, router",
        ],
    );
    assert!(matches!(e, DeployError::UnknownValue { .. }));
    let text = omni_with(
        "model = \"m/snac\"\n",
        "model = \"m/snac\"\ndtype = \"fp8\"\n",
    );
    refused(
        &text,
        &[
            "stage `code2wav`",
            "field `dtype`",
            "`fp8`",
            "f32, bf16, f16",
        ],
    );
    let text = omni_with(
        "carries = \"codes\"\n",
        "carries = \"codes\"\nconnector = \"rdma\"\n",
    );
    refused(
        &text,
        &[
            "edge #2 (talker -> code2wav)",
            "field `connector`",
            "`rdma`",
            "inproc, shm, tcp",
        ],
    );
    let text = omni_with("carries = \"hidden\"", "carries = \"audio\"");
    refused(
        &text,
        &[
            "edge #1 (thinker -> talker)",
            "field `carries`",
            "`audio`",
            "text, tokens, hidden",
        ],
    );
    let text = omni_with("outputs = [\"codes\", \"tokens\"]", "outputs = [\"token\"]");
    refused(
        &text,
        &["stage `talker`", "field `outputs`", "`token`", "pcm"],
    );
}

#[test]
fn wrong_value_types_name_the_field() {
    let text = omni_with(
        "model = \"m/talker\"\n",
        "model = \"m/talker\"\nmax_batch_size = \"eight\"\n",
    );
    let e = refused(
        &text,
        &["stage `talker`", "field `max_batch_size`", "invalid type"],
    );
    assert!(matches!(e, DeployError::BadValue { .. }));
    let text = omni_with(
        "model = \"m/talker\"\n",
        "model = \"m/talker\"\nreplicas = -1\n",
    );
    refused(&text, &["stage `talker`", "field `replicas`"]);
    let text = omni_with(
        "model = \"m/snac\"\n",
        "model = \"m/snac\"\n[stage.sampling]\ntop_k = \"many\"\n",
    );
    refused(&text, &["stage `code2wav`", "field `sampling.top_k`"]);
    refused(
        &omni_with("carries = \"codes\"\n", "carries = \"codes\"\nstream = 4\n"),
        &["field `stream`"],
    );
    refused(
        &omni_with("audio = \"code2wav\"", "audio = 3"),
        &["[outputs]", "field `outputs.audio`"],
    );
}

#[test]
fn duplicate_stage_ids() {
    let text = omni_with("id = \"talker\"", "id = \"thinker\"");
    let e = refused(
        &text,
        &["stage `thinker`", "field `id`", "duplicate", "#1 and #2"],
    );
    assert!(matches!(e, DeployError::DuplicateStage { .. }));
}

#[test]
fn edges_naming_unknown_stages() {
    let e = refused(
        &omni_with("from = \"talker\"", "from = \"talkr\""),
        &[
            "edge #2 (talkr -> code2wav)",
            "field `from`",
            "unknown stage `talkr`",
        ],
    );
    assert!(matches!(e, DeployError::UnknownEdgeStage { .. }));
    refused(
        &omni_with("to = \"code2wav\"", "to = \"vocoder\""),
        &["edge #2 (talker -> vocoder)", "field `to`"],
    );
}

#[test]
fn cycles_name_their_stages() {
    let text =
        format!("{OMNI}\n[[edge]]\nfrom = \"talker\"\nto = \"thinker\"\ncarries = \"tokens\"\n");
    let e = refused(
        &text,
        &[
            "edge #3 (talker -> thinker)",
            "field `to`",
            "cycle",
            "thinker -> talker -> thinker",
        ],
    );
    assert!(matches!(e, DeployError::Cycle { .. }));
    let text =
        format!("{OMNI}\n[[edge]]\nfrom = \"thinker\"\nto = \"thinker\"\ncarries = \"text\"\n");
    refused(
        &text,
        &["edge #3 (thinker -> thinker)", "thinker -> thinker"],
    );
}

#[test]
fn dead_stages() {
    let text = format!("{OMNI}\n[[stage]]\nid = \"aux\"\nkind = \"encoder\"\nmodel = \"m/clip\"\n");
    let e = refused(&text, &["stage `aux`", "field `outputs`", "dead stage"]);
    assert!(matches!(e, DeployError::DeadStage { .. }));
}

#[test]
fn outputs_section_problems() {
    let e = refused(
        &omni_with("audio = \"code2wav\"", "audio = \"vocoder\""),
        &["stage `vocoder`", "field `outputs.audio`", "does not exist"],
    );
    assert!(matches!(e, DeployError::OutputUnknownStage { .. }));
    let e = refused(
        &omni_with("audio = \"code2wav\"", "video = \"code2wav\""),
        &["[outputs]", "field `outputs.video`"],
    );
    assert!(matches!(e, DeployError::UnknownModality { .. }));
    let text = OMNI.replace("text = \"thinker\"\naudio = \"code2wav\"\n", "");
    let e = refused(&text, &["[outputs]", "field `outputs`", "at least one"]);
    assert!(matches!(e, DeployError::NoOutputs { .. }));
    let text = OMNI
        .split("[outputs]")
        .next()
        .unwrap_or_default()
        .to_string();
    refused(&text, &["field `outputs`", "at least one"]);
    let e = refused(
        &omni_with(
            "text = \"thinker\"",
            "text = \"thinker\"\nimage = \"thinker\"",
        ),
        &["stage `thinker`", "field `outputs.image`", "`image`"],
    );
    assert!(matches!(e, DeployError::OutputNotProduced { .. }));
    refused(
        &omni_with("audio = \"code2wav\"", "audio = \"talker\""),
        &["stage `talker`", "field `outputs.audio`", "`pcm`"],
    );
}

#[test]
fn payload_kinds_must_fit_producer_and_consumer() {
    // The thinker is not asked for hidden states, so the edge cannot carry them.
    let e = refused(
        &omni_with("outputs = [\"text\", \"hidden\"]", "outputs = [\"text\"]"),
        &[
            "edge #1 (thinker -> talker)",
            "field `carries`",
            "stage `thinker`",
            "does not produce `hidden`",
        ],
    );
    assert!(matches!(e, DeployError::EdgeNotProduced { .. }));
    // A codec cannot take hidden states.
    let text = omni_with("carries = \"codes\"", "carries = \"codes\"\n\n[[edge]]\nfrom = \"thinker\"\nto = \"code2wav\"\ncarries = \"hidden\"");
    let e = refused(
        &text,
        &[
            "edge #3 (thinker -> code2wav)",
            "field `carries`",
            "stage `code2wav` (codec)",
            "accepts: codes",
        ],
    );
    assert!(matches!(e, DeployError::EdgeNotAccepted { .. }));
    // An llm cannot produce images.
    let e = refused(
        &omni_with(
            "outputs = [\"codes\", \"tokens\"]",
            "outputs = [\"tokens\", \"image\"]",
        ),
        &[
            "stage `talker`",
            "field `outputs`",
            "llm stage cannot produce `image`",
            "text, tokens, hidden, codes",
        ],
    );
    assert!(matches!(e, DeployError::KindCannotProduce { .. }));
    refused(
        &omni_with("outputs = [\"codes\", \"tokens\"]", "outputs = []"),
        &["stage `talker`", "field `outputs`", "at least one"],
    );
    // Codes come only from a talker.
    let e = refused(
        &omni_with("[stage.talker]", "[stage.other]"),
        &["stage `talker`", "field `other`"],
    );
    assert!(matches!(e, DeployError::UnknownField { .. }), "{e:?}");
    let no_talker = OMNI.replace(
        "[stage.talker]\ncodec_token_offset = 10\ncodebook_size = 64\nframe_layout = [0, 1, 1]\nend_token_ids = [2]\n",
        "",
    );
    refused(
        &no_talker,
        &["stage `talker`", "field `outputs`", "[stage.talker]"],
    );
    refused(
        &omni_with(
            "model = \"m/snac\"",
            "model = \"m/snac\"\n[stage.talker]\ncodec_token_offset = 1\ncodebook_size = 1\nframe_layout = [0]\nend_token_ids = [0]",
        ),
        &["stage `code2wav`", "field `talker`", "only llm stages speak"],
    );
}

#[test]
fn unknown_devices() {
    for dev in ["gpu", "cuda:x", "tpu:0", "cuda:", "cuda", "cuda:-1", "CPU"] {
        let text = omni_with(
            "model = \"m/talker\"\n",
            &format!("model = \"m/talker\"\ndevice = \"{dev}\"\n"),
        );
        let e = refused(
            &text,
            &[
                "stage `talker`",
                "field `device`",
                &format!("`{dev}`"),
                "cuda:N",
            ],
        );
        assert!(matches!(e, DeployError::UnknownDevice { .. }));
        let parse_err = dev.parse::<DeviceSpec>().unwrap_err();
        assert!(parse_err.to_string().contains(&format!("`{dev}`")));
    }
    assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
    assert_eq!("cuda:0".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
    assert_eq!("cuda:12".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(12)));
    assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
}

#[test]
fn numeric_limits() {
    for field in [
        "replicas",
        "max_batch_size",
        "max_batched_tokens",
        "max_queue",
        "max_model_len",
    ] {
        let text = omni_with(
            "model = \"m/talker\"\n",
            &format!("model = \"m/talker\"\n{field} = 0\n"),
        );
        let e = refused(
            &text,
            &["stage `talker`", &format!("field `{field}`"), ">= 1"],
        );
        assert!(matches!(e, DeployError::OutOfRange { .. }), "{field}");
    }
    let text = omni_with(
        "carries = \"hidden\"\n",
        "carries = \"hidden\"\nstream = { chunk = 0 }\n",
    );
    refused(
        &text,
        &[
            "edge #1 (thinker -> talker)",
            "field `stream.chunk`",
            ">= 1",
        ],
    );
    for (field, value, rule) in [
        ("temperature", "-0.5", ">= 0"),
        ("top_p", "0", "(0, 1]"),
        ("top_p", "1.5", "(0, 1]"),
        ("repetition_penalty", "0", "> 0"),
        ("max_tokens", "0", ">= 1"),
    ] {
        let sampling = format!("model = \"m/snac\"\n[stage.sampling]\n{field} = {value}\n");
        let text = omni_with("model = \"m/snac\"\n", &sampling);
        let e = refused(
            &text,
            &[
                "stage `code2wav`",
                &format!("field `sampling.{field}`"),
                rule,
            ],
        );
        assert!(matches!(e, DeployError::OutOfRange { .. }));
    }
}

#[test]
fn syntax_errors_name_the_file_and_line() {
    let e = refused("name = \"x\"\n[[stage]\nid = 1\n", &["TOML", "line 2"]);
    assert!(matches!(e, DeployError::Syntax { .. }));
    refused("[[stage]]\nid = \"a\"\nid = \"b\"\n", &["TOML"]);
}

#[test]
fn unreadable_file() {
    let e = DeployGraph::load(Path::new("/nonexistent/deploy/none.toml")).unwrap_err();
    assert!(matches!(e, DeployError::Read { .. }));
    assert!(
        e.to_string().starts_with("/nonexistent/deploy/none.toml: "),
        "{e}"
    );
}

#[test]
fn check_models_needs_dirs_with_config_json() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        "[[stage]]\nid = \"lm\"\nkind = \"llm\"\nmodel = \"ckpt\"\n[outputs]\ntext = \"lm\"\n";
    let g = DeployGraph::from_toml_str(text, Path::new(FILE), dir.path(), &[]).unwrap();

    let e = g.check_models().unwrap_err();
    assert!(matches!(e, DeployError::ModelMissing { .. }));
    let msg = e.to_string();
    for p in [FILE, "stage `lm`", "field `model`", "does not exist"] {
        assert!(msg.contains(p), "`{p}` missing in: {msg}");
    }

    std::fs::create_dir(dir.path().join("ckpt")).unwrap();
    let e = g.check_models().unwrap_err();
    assert!(matches!(e, DeployError::ModelNoConfig { .. }));
    let msg = e.to_string();
    for p in [FILE, "stage `lm`", "field `model`", "config.json"] {
        assert!(msg.contains(p), "`{p}` missing in: {msg}");
    }

    std::fs::write(dir.path().join("ckpt/config.json"), "{}").unwrap();
    g.check_models().unwrap();
}

#[test]
fn malformed_shapes_do_not_panic() {
    for text in [
        "",
        "stage = 3",
        "[stage]\nid = \"a\"\nkind = \"llm\"\nmodel = \"m\"",
        "stage = [1, 2]",
        "edge = \"x\"",
        "outputs = [\"text\"]",
        "[[stage]]\nid = 7\nkind = \"llm\"\nmodel = \"m\"",
        "[[stage]]\nid = \"\"\nkind = \"llm\"\nmodel = \"m\"",
        "[[stage]]\nid = \"a\"\nkind = \"llm\"\nmodel = \"\"",
        "[[stage]]\nid = \"a\"\nkind = \"llm\"\nmodel = \"m\"\nsampling = 1",
        "[[stage]]\nid = \"a\"\nkind = \"llm\"\nmodel = \"m\"\n[stage.sampling]\ntemperature = nan",
        "[[stage]]\nid = \"a\"\nkind = \"llm\"\nmodel = \"m\"\n[stage.sampling]\ntop_p = inf",
        "[[stage]]\nid = \"a\"\nkind = \"llm\"\nmodel = \"m\"\nmax_queue = 99999999999999999999",
        "[[edge]]\nfrom = 1\nto = []\ncarries = {}\n",
    ] {
        let e = parse(text).expect_err(text);
        assert!(e.to_string().starts_with(FILE), "{e}");
    }
}

#[test]
fn step_budget_below_batch_size() {
    let text = omni_with(
        "model = \"m/snac\"\n",
        "model = \"m/snac\"\nmax_batch_size = 32\nmax_batched_tokens = 16\n",
    );
    refused(
        &text,
        &[
            "stage `code2wav`",
            "field `max_batched_tokens`",
            "less than max_batch_size (32)",
        ],
    );
    let ok = omni_with(
        "model = \"m/snac\"\n",
        "model = \"m/snac\"\nmax_batch_size = 8\nmax_batched_tokens = 8\n",
    );
    parse(&ok).expect("a budget equal to the batch size is valid");
}
