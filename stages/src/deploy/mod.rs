//! The stage-graph deployment file: schema, loading (TOML through the `config` crate, with
//! `OMNISTAGE_*` environment overrides), validation and rendering (text, Graphviz DOT).
//!
//! Validation happens before any weights load; every error names the file, the stage (or edge)
//! and the field.
//!
//! Layers, lowest first: built-in defaults → the TOML file → environment overrides:
//! - `OMNISTAGE_NAME=x` replaces the top-level `name`;
//! - `OMNISTAGE_STAGE__<ID>__<FIELD>=value` replaces a field of the stage whose id matches `<ID>`
//!   case-insensitively, `_` standing for `-` (e.g. `OMNISTAGE_STAGE__THINKER__MAX_BATCH_SIZE=8`);
//! - `OMNISTAGE_STAGE__<ID>__SAMPLING__<FIELD>=value` replaces a sampling default.
//!
//! List fields take a JSON array (`["text","hidden"]`) or, except `sampling.stop`, a comma-separated
//! list. Other `OMNISTAGE_*` variables without a `__` (e.g. `OMNISTAGE_LOG`) belong to other
//! components and are ignored here; any other variable with a `__` is an error.

mod cluster;
mod env;
mod error;
mod fields;
mod image;
mod media;
mod raw;
mod render;
mod router;
mod talker;
mod validate;

pub use cluster::{ClusterSettings, SecretError, SECRET_ENV};
pub use error::{DeployError, Site};
pub use image::{ImageSettings, IMAGE_SIDE_MULTIPLE};
pub use media::{EncoderSettings, MediaLimits};
pub use router::{
    router_experts, MotSettings, RouteRule, RouterForm, RouterSettings, RuleCondition,
};
pub use talker::{TalkerSettings, DEFAULT_VOICE};

use crate::job::{Modality, SamplingParams};
use crate::payload::PayloadKind;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// What a stage runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    Llm,
    Dit,
    Vae,
    Codec,
    Encoder,
    Router,
}

/// Element type of a stage's weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    #[default]
    F32,
    Bf16,
    F16,
}

/// Where a stage runs: `cpu` or `cuda:N` (parsed from a string).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

/// How an edge moves payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectorKind {
    #[default]
    Inproc,
    Shm,
    Tcp,
}

/// One stage of the graph, after defaults are applied.
#[derive(Debug, Clone, PartialEq)]
pub struct StageSpec {
    pub id: String,
    pub kind: StageKind,
    /// Checkpoint directory, resolved against the deployment file's folder when relative.
    pub model: PathBuf,
    pub dtype: DType,
    pub device: DeviceSpec,
    pub replicas: usize,
    pub max_batch_size: usize,
    pub max_batched_tokens: usize,
    pub max_wait_ms: u64,
    /// Jobs that may wait in the stage's queue before new ones are refused (429).
    pub max_queue: usize,
    /// Longest prompt + generation the stage accepts (defaults to the model's own limit).
    pub max_model_len: Option<usize>,
    /// Memory for the stage's paged KV cache (LLM stages); `None` = sized from the batching
    /// limits. Written as bytes or with a unit: `"256MiB"`, `"2GiB"`, `"500MB"`.
    pub kv_cache_bytes: Option<u64>,
    /// Tokens per KV cache block (LLM stages).
    pub kv_block_size: usize,
    /// Reuse KV blocks of identical prompt prefixes across requests (LLM stages).
    pub prefix_caching: bool,
    /// Payload kinds this stage is asked to produce (used by `check` and edge validation).
    pub outputs: Vec<PayloadKind>,
    /// Default sampling for this stage; requests override field by field.
    pub sampling: SamplingParams,
    /// Image limits and defaults (`[stage.image]`; dit and encoder stages).
    pub image: ImageSettings,
    /// Codec-token layout, prompt and voices of an `llm` stage that speaks (`[stage.talker]`).
    pub talker: Option<TalkerSettings>,
    /// What an encoder stage encodes and its embedding cache (`[stage.encoder]`).
    pub encoder: EncoderSettings,
    /// Run each replica in a supervised `omnistage worker` child process of the gateway.
    pub process: bool,
    /// The stage's replicas are `omnistage worker --listen` processes started elsewhere (other
    /// hosts, Kubernetes pods), found through `[cluster]` etcd; `replicas` is then ignored.
    pub remote: bool,
    /// Which experts a router stage chooses among, and how (`[stage.router]`; routers only).
    pub router: Option<RouterSettings>,
    /// This llm stage is an expert of a Mixture-of-Thoughts checkpoint (`[stage.mot]`).
    pub mot: Option<MotSettings>,
}

/// Streaming settings of an edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSpec {
    /// Deliver every `chunk` tokens/frames.
    pub chunk: usize,
    /// Chunks delivered but not yet consumed before the producer is held back.
    pub buffer: usize,
}

impl StreamSpec {
    /// Chunks in flight when `buffer` is not given.
    pub const DEFAULT_BUFFER: usize = 8;
}

/// One edge of the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeSpec {
    pub from: String,
    pub to: String,
    pub carries: PayloadKind,
    pub connector: ConnectorKind,
    pub stream: Option<StreamSpec>,
}

/// A validated deployment: stages, edges, and which stage produces each final modality.
#[derive(Debug, Clone, PartialEq)]
pub struct DeployGraph {
    /// Where the graph was read from (for error messages); `<embedded>` for the built-in default.
    pub source: PathBuf,
    pub name: String,
    pub stages: Vec<StageSpec>,
    pub edges: Vec<EdgeSpec>,
    /// Final output modality → producing stage id (in a stable order).
    pub outputs: Vec<(Modality, String)>,
    /// What chat requests may carry as image and audio parts (`[media]`).
    pub media: MediaLimits,
    /// Discovery and link security for `remote` stages (`[cluster]`).
    pub cluster: Option<ClusterSettings>,
}

impl StageKind {
    /// Every kind, in the order the docs list them.
    pub const ALL: [StageKind; 6] = [
        StageKind::Llm,
        StageKind::Dit,
        StageKind::Vae,
        StageKind::Codec,
        StageKind::Encoder,
        StageKind::Router,
    ];

    /// The name used in the TOML file.
    pub fn as_str(self) -> &'static str {
        match self {
            StageKind::Llm => "llm",
            StageKind::Dit => "dit",
            StageKind::Vae => "vae",
            StageKind::Codec => "codec",
            StageKind::Encoder => "encoder",
            StageKind::Router => "router",
        }
    }

    /// Payload kinds a stage of this kind can produce.
    pub fn produces(self) -> &'static [PayloadKind] {
        use PayloadKind::*;
        match self {
            StageKind::Llm => &[Text, Tokens, Hidden, Codes],
            StageKind::Dit => &[Latents],
            StageKind::Vae => &[Image],
            StageKind::Codec => &[Pcm],
            StageKind::Encoder => &[Embeddings, Hidden, MediaEmbeddings],
            StageKind::Router => &[Route],
        }
    }

    /// Payload kinds a stage of this kind can take on an inbound edge.
    pub fn accepts(self) -> &'static [PayloadKind] {
        use PayloadKind::*;
        match self {
            StageKind::Llm => &[Text, Tokens, Hidden, Embeddings, MediaEmbeddings, Route],
            StageKind::Dit => &[Embeddings, Hidden, Text],
            StageKind::Vae => &[Latents],
            StageKind::Codec => &[Codes],
            StageKind::Encoder => &[Text, Image, Pcm],
            // A router reads the request itself: it is an entry stage.
            StageKind::Router => &[],
        }
    }

    /// What a stage produces when its `outputs` field is left out: everything it can produce.
    /// (An `llm` stage makes codes only as a talker; a talker's default is tokens and codes.)
    pub fn default_outputs(self) -> Vec<PayloadKind> {
        self.produces()
            .iter()
            .copied()
            .filter(|p| !(self == StageKind::Llm && *p == PayloadKind::Codes))
            .filter(|p| !(self == StageKind::Encoder && *p == PayloadKind::MediaEmbeddings))
            .collect()
    }
}

impl fmt::Display for StageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl DType {
    /// Every dtype.
    pub const ALL: [DType; 3] = [DType::F32, DType::Bf16, DType::F16];

    /// The name used in the TOML file.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ConnectorKind {
    /// Every connector.
    pub const ALL: [ConnectorKind; 3] = [
        ConnectorKind::Inproc,
        ConnectorKind::Shm,
        ConnectorKind::Tcp,
    ];

    /// The name used in the TOML file.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectorKind::Inproc => "inproc",
            ConnectorKind::Shm => "shm",
            ConnectorKind::Tcp => "tcp",
        }
    }
}

impl fmt::Display for ConnectorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device string that is neither `cpu` nor `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown device `{0}`; expected `cpu` or `cuda:N` (e.g. `cuda:0`)")]
pub struct ParseDeviceError(pub String);

impl FromStr for DeviceSpec {
    type Err = ParseDeviceError;

    /// Parses `cpu`, `cuda:0`, `cuda:12`; anything else is an error naming the value.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "cpu" {
            return Ok(DeviceSpec::Cpu);
        }
        let index = s
            .strip_prefix("cuda:")
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        match index.and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => Ok(DeviceSpec::Cuda(n)),
            None => Err(ParseDeviceError(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The payload kind a stage must produce to serve a final output modality
/// (text → `text`, image → `image`, audio → `pcm`).
pub fn modality_payload(m: Modality) -> PayloadKind {
    match m {
        Modality::Text => PayloadKind::Text,
        Modality::Image => PayloadKind::Image,
        Modality::Audio => PayloadKind::Pcm,
    }
}

/// The process's `OMNISTAGE_*` environment variables (names matched case-insensitively; variables
/// that are not valid UTF-8 are skipped), as [`DeployGraph::from_toml_str`] takes them.
pub fn omnistage_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| env::is_omnistage_var(k))
        .collect()
}

impl DeployGraph {
    /// Reads `path`, applies the process's `OMNISTAGE_*` overrides, resolves relative model paths
    /// against the file's folder and validates the graph (no weights are touched).
    pub fn load(path: &Path) -> Result<DeployGraph, DeployError> {
        let text = std::fs::read_to_string(path).map_err(|e| DeployError::Read {
            file: path.display().to_string(),
            message: e.to_string(),
        })?;
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Self::from_toml_str(&text, path, &base, &omnistage_env())
    }

    /// Parses TOML `text` (named `source` in errors), applies the overrides in `env`
    /// (`(name, value)` pairs; names not starting with `OMNISTAGE_` are ignored), resolves relative
    /// model paths against `base_dir` and validates the graph.
    pub fn from_toml_str(
        text: &str,
        source: &Path,
        base_dir: &Path,
        env: &[(String, String)],
    ) -> Result<DeployGraph, DeployError> {
        let file = source.display().to_string();
        let tree = raw::read_tree(text, &file, env)?;
        let mut graph = raw::build_graph(&tree, &file, base_dir)?;
        if graph.name.is_empty() {
            graph.name = source
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
        }
        graph.source = source.to_path_buf();
        validate::check(&graph, &file)?;
        Ok(graph)
    }

    /// Checks that every stage's model directory exists and holds a `config.json` (or, for a
    /// `dit` stage, that its `*.safetensors` single-file checkpoint exists).
    pub fn check_models(&self) -> Result<(), DeployError> {
        let file = self.source.display().to_string();
        for s in &self.stages {
            if s.kind == StageKind::Router && s.model.as_os_str().is_empty() {
                continue; // a rule-form router has no model
            }
            let path = s.model.display().to_string();
            // A `dit` stage may name a single SD3/FLUX checkpoint file; its config is inferred
            // from the tensors when the engine loads, so the file itself is all there is to check.
            let single_file = s.kind == StageKind::Dit
                && s.model
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
            if single_file {
                if !s.model.is_file() {
                    return Err(DeployError::ModelMissing {
                        file,
                        stage: s.id.clone(),
                        path,
                    });
                }
                continue;
            }
            if !s.model.is_dir() {
                return Err(DeployError::ModelMissing {
                    file,
                    stage: s.id.clone(),
                    path,
                });
            }
            let (config, expected) = if s.mot.is_some() {
                (
                    "mot_config.json",
                    "mot_config.json (a Mixture-of-Thoughts checkpoint folder)",
                )
            } else if s.kind == StageKind::Router {
                (
                    "router_config.json",
                    "router_config.json (a router checkpoint folder)",
                )
            } else {
                (
                    "config.json",
                    "config.json (or model_index.json for a diffusers pipeline folder)",
                )
            };
            let pipeline = s.kind != StageKind::Llm && s.model.join("model_index.json").is_file();
            if !s.model.join(config).is_file() && !pipeline {
                return Err(DeployError::ModelNoConfig {
                    file,
                    stage: s.id.clone(),
                    path,
                    expected: expected.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Model names that rule-form routers match (`model:NAME` rules): a client may ask for them
    /// in a request's `model` field.
    pub fn routed_model_names(&self) -> Vec<&str> {
        self.stages
            .iter()
            .filter_map(|s| s.router.as_ref())
            .filter_map(|r| match &r.form {
                RouterForm::Rules { rules, .. } => Some(rules),
                RouterForm::Model => None,
            })
            .flatten()
            .filter_map(|rule| match &rule.when {
                RuleCondition::Model(name) => Some(name.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Whether a stage of the graph is a router.
    pub fn has_router(&self) -> bool {
        self.stages.iter().any(|s| s.kind == StageKind::Router)
    }

    /// The stage with this id.
    pub fn stage(&self, id: &str) -> Option<&StageSpec> {
        self.stages.iter().find(|s| s.id == id)
    }

    /// Edges that end at stage `id`, in file order.
    pub fn inbound<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a EdgeSpec> + 'a {
        self.edges.iter().filter(move |e| e.to == id)
    }

    /// Edges that start at stage `id`, in file order.
    pub fn outbound<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a EdgeSpec> + 'a {
        self.edges.iter().filter(move |e| e.from == id)
    }

    /// Stages with no inbound edge (where a request enters the graph), in file order.
    pub fn entry_stages(&self) -> Vec<&StageSpec> {
        self.stages
            .iter()
            .filter(|s| self.inbound(&s.id).next().is_none())
            .collect()
    }

    /// The stage that produces final output modality `m`, if the deployment offers it.
    pub fn output_stage(&self, m: Modality) -> Option<&StageSpec> {
        let (_, id) = self.outputs.iter().find(|(o, _)| *o == m)?;
        self.stage(id)
    }

    /// The stages that encode the request's media of modality `m` (images or audio) for an LLM;
    /// empty when the deployment takes no such input.
    pub fn media_encoders(&self, m: Modality) -> impl Iterator<Item = &StageSpec> {
        self.stages.iter().filter(move |s| {
            s.kind == StageKind::Encoder && m != Modality::Text && s.encoder.encodes == m
        })
    }

    /// Whether chat requests may carry media of modality `m`.
    pub fn takes_media(&self, m: Modality) -> bool {
        self.media_encoders(m).next().is_some()
    }

    /// A human-readable summary: stages (kind, device, dtype, batching), edges, outputs.
    pub fn to_text(&self) -> String {
        render::text(self)
    }

    /// A Graphviz DOT digraph of the stages, edges and output modalities.
    pub fn to_dot(&self) -> String {
        render::dot(self)
    }
}

/// Joins names as `a, b, c` for error messages.
fn join<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
