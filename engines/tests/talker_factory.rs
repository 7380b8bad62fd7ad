//! The factory builds a talker for an `llm` stage with a `[stage.talker]` table, with a `hidden`
//! edge from a thinker, and refuses a `hidden` edge into a plain LLM stage.

use omnistage_engines::factory::{build_engine, StageWiring};
use omnistage_engines::tiny::{self, TinyTalkerSpec};
use omnistage_stages::deploy::DeployGraph;
use omnistage_stages::{
    AudioParams, HiddenStates, JobId, JobRequest, Modality, Payload, Prompt, SamplingParams,
    StageEvent, StageInput, StepWork,
};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn deployment(dir: &Path, talker_table: bool) -> DeployGraph {
    let s = TinyTalkerSpec::default().settings();
    let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
    let (table, tail) = if talker_table {
        let table = format!(
            r#"
[stage.talker]
codec_token_offset = {}
codebook_size = {}
frame_layout = [0, 1, 2, 2, 1, 2, 2]
end_token_ids = [{}]
prompt_prefix_ids = [{}]
prompt_suffix_ids = [{}]
prompt_format = "{{voice}}{{text}}"
voices = {{ default = "" }}

[stage.sampling]
temperature = 0.0
max_tokens = 14
ignore_eos = true
"#,
            s.codec_token_offset,
            s.codebook_size,
            list(&s.end_token_ids),
            list(&s.prompt_prefix_ids),
            list(&s.prompt_suffix_ids),
        );
        let tail = r#"
[[stage]]
id = "codec"
kind = "codec"
model = "codec"

[[edge]]
from = "talker"
to = "codec"
carries = "codes"

[outputs]
text = "thinker"
audio = "codec"
"#;
        (table, tail)
    } else {
        (String::new(), "[outputs]\ntext = \"talker\"\n")
    };
    let text = format!(
        r#"
name = "talk"

[[stage]]
id = "thinker"
kind = "llm"
model = "tiny-omni/thinker"

[[stage]]
id = "talker"
kind = "llm"
model = "talker"
{table}

[[edge]]
from = "thinker"
to = "talker"
carries = "hidden"
stream = {{ chunk = 1 }}

{tail}
"#
    );
    DeployGraph::from_toml_str(&text, &dir.join("deploy.toml"), dir, &[]).unwrap()
}

fn wiring(graph: &DeployGraph, id: &str) -> StageWiring {
    StageWiring {
        received: graph.inbound(id).map(|e| e.carries).collect(),
        consumed: graph.outbound(id).map(|e| e.carries).collect(),
        ..Default::default()
    }
}

#[test]
fn a_talker_with_a_hidden_edge_builds_and_speaks() {
    let tmp = tempfile::tempdir().unwrap();
    tiny::make_tiny(tmp.path(), 1).unwrap();
    tiny::write_tiny_talker(&tmp.path().join("talker"), &TinyTalkerSpec::default(), 1).unwrap();
    let graph = deployment(tmp.path(), true);
    let mut engine = build_engine(graph.stage("talker").unwrap(), &wiring(&graph, "talker"))
        .unwrap_or_else(|e| panic!("{e}"));
    let request = JobRequest {
        id: JobId(1),
        prompt: Prompt::Completion("hi".into()),
        sampling: SamplingParams::default(),
        outputs: vec![Modality::Audio],
        deadline: Instant::now() + Duration::from_secs(60),
        image: None,
        media: Vec::new(),
        audio: Some(AudioParams {
            voice: "default".into(),
            seed: 3,
        }),
        route: Default::default(),
    };
    let input = StageInput {
        request: Arc::new(request),
        upstream: vec![Payload::Hidden(HiddenStates::new(vec![0.5; 64 * 3], 64))],
        client_facing: false,
        streaming: false,
    };
    engine.admit(JobId(1), input).unwrap();
    let (mut frames, mut done) = (0, false);
    while !done {
        engine
            .step(
                &[StepWork {
                    job: JobId(1),
                    token_budget: 64,
                }],
                &mut |_, ev| match ev {
                    StageEvent::Output(ps) => {
                        frames += ps.iter().filter(|p| matches!(p, Payload::Codes(_))).count()
                    }
                    StageEvent::Finished { .. } => done = true,
                    StageEvent::Failed(e) => panic!("{e}"),
                    _ => {}
                },
            )
            .unwrap();
    }
    assert_eq!(frames, 2, "max_tokens 14 is two frames");

    // A plain LLM stage still refuses hidden states, naming the talker table.
    let graph = deployment(tmp.path(), false);
    let err = build_engine(graph.stage("talker").unwrap(), &wiring(&graph, "talker"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("hidden") && err.contains("[stage.talker]"),
        "{err}"
    );
}
