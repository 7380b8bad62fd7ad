//! Why a deployment file was refused, and where in the file the problem sits.

use super::StageKind;
use crate::job::Modality;
use crate::payload::PayloadKind;
use std::fmt;

/// Where in the deployment file a problem sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Site {
    /// The top-level table.
    Top,
    /// A stage, by id.
    Stage(String),
    /// A stage whose id is missing or unusable, by 1-based position in the file.
    StageAt(usize),
    /// An edge: 1-based position in the file and its endpoints as written (`?` when missing).
    Edge {
        index: usize,
        from: String,
        to: String,
    },
    /// The `[outputs]` table.
    Outputs,
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Site::Top => f.write_str("top level"),
            Site::Stage(id) => write!(f, "stage `{id}`"),
            Site::StageAt(n) => write!(f, "stage #{n} (no id)"),
            Site::Edge { index, from, to } => write!(f, "edge #{index} ({from} -> {to})"),
            Site::Outputs => f.write_str("[outputs]"),
        }
    }
}

/// Why a deployment file was refused. Every message starts with the file, then the stage or edge,
/// then the field: `deploy/x.toml: stage `talker`, field `inputs`: unknown field; ...`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeployError {
    /// The file could not be read.
    #[error("{file}: cannot read the deployment file: {message}")]
    Read { file: String, message: String },
    /// The file is not valid TOML (the message carries line and column).
    #[error("{file}: TOML syntax error: {message}")]
    Syntax { file: String, message: String },
    /// A key the schema does not know (typo).
    #[error("{file}: {site}, field `{field}`: unknown field; allowed fields: {allowed}")]
    UnknownField {
        file: String,
        site: Box<Site>,
        field: String,
        allowed: String,
    },
    /// A required key is absent.
    #[error("{file}: {site}, field `{field}`: required field is missing")]
    MissingField {
        file: String,
        site: Box<Site>,
        field: String,
    },
    /// A value of the wrong type or shape.
    #[error("{file}: {site}, field `{field}`: {message}")]
    BadValue {
        file: String,
        site: Box<Site>,
        field: String,
        message: String,
    },
    /// A name outside an enumeration (kind, dtype, connector, payload kind).
    #[error("{file}: {site}, field `{field}`: unknown value `{value}`; allowed values: {allowed}")]
    UnknownValue {
        file: String,
        site: Box<Site>,
        field: String,
        value: String,
        allowed: String,
    },
    /// A device string that is neither `cpu` nor `cuda:N`.
    #[error(
        "{file}: {site}, field `{field}`: unknown device `{value}`; expected `cpu` or `cuda:N`"
    )]
    UnknownDevice {
        file: String,
        site: Box<Site>,
        field: String,
        value: String,
    },
    /// A number outside its allowed range.
    #[error("{file}: {site}, field `{field}`: {value} is out of range; it must be {rule}")]
    OutOfRange {
        file: String,
        site: Box<Site>,
        field: String,
        value: String,
        rule: &'static str,
    },
    /// Two stages share an id.
    #[error(
        "{file}: stage `{stage}`, field `id`: duplicate stage id (stages #{first} and #{second})"
    )]
    DuplicateStage {
        file: String,
        stage: String,
        first: usize,
        second: usize,
    },
    /// An edge's `from` or `to` names no stage.
    #[error("{file}: {site}, field `{field}`: unknown stage `{stage}`")]
    UnknownEdgeStage {
        file: String,
        site: Box<Site>,
        field: String,
        stage: String,
    },
    /// The edges form a cycle; `site` is the edge that closes it.
    #[error("{file}: {site}, field `to`: the edges form a cycle: {}", .cycle.join(" -> "))]
    Cycle {
        file: String,
        site: Box<Site>,
        cycle: Vec<String>,
    },
    /// A stage from which no edge path reaches a stage named in `[outputs]`.
    #[error(
        "{file}: stage `{stage}`, field `outputs`: dead stage: no edge path leads from it to a stage named in [outputs]"
    )]
    DeadStage { file: String, stage: String },
    /// `[outputs]` is missing or empty.
    #[error("{file}: [outputs], field `outputs`: no output modality; name at least one of text, image, audio")]
    NoOutputs { file: String },
    /// An `[outputs]` key that is not a modality.
    #[error(
        "{file}: [outputs], field `outputs.{key}`: unknown modality; allowed: text, image, audio"
    )]
    UnknownModality { file: String, key: String },
    /// `[outputs]` names a stage that does not exist.
    #[error("{file}: stage `{stage}`, field `outputs.{modality}`: [outputs] names a stage that does not exist")]
    OutputUnknownStage {
        file: String,
        modality: Modality,
        stage: String,
    },
    /// The output stage does not produce the payload kind the modality needs.
    #[error(
        "{file}: stage `{stage}`, field `outputs.{modality}`: {modality} output needs a stage producing `{needs}`; this stage's outputs are: {has}"
    )]
    OutputNotProduced {
        file: String,
        modality: Modality,
        stage: String,
        needs: PayloadKind,
        has: String,
    },
    /// A stage's `outputs` lists a payload kind its kind cannot produce.
    #[error("{file}: stage `{stage}`, field `outputs`: a {kind} stage cannot produce `{payload}`; it produces: {allowed}")]
    KindCannotProduce {
        file: String,
        stage: String,
        kind: StageKind,
        payload: PayloadKind,
        allowed: String,
    },
    /// An edge carries a payload kind its producer is not asked to produce.
    #[error("{file}: {site}, field `carries`: stage `{stage}` does not produce `{payload}`; its outputs are: {has}")]
    EdgeNotProduced {
        file: String,
        site: Box<Site>,
        stage: String,
        payload: PayloadKind,
        has: String,
    },
    /// An edge carries a payload kind its consumer cannot take.
    #[error(
        "{file}: {site}, field `carries`: stage `{stage}` ({kind}) cannot accept `{payload}`; it accepts: {allowed}"
    )]
    EdgeNotAccepted {
        file: String,
        site: Box<Site>,
        stage: String,
        kind: StageKind,
        payload: PayloadKind,
        allowed: String,
    },
    /// An `OMNISTAGE_*` override that names an unknown stage or field, or has an unparsable value.
    #[error("{file}: environment variable `{var}`: {message}")]
    Override {
        file: String,
        var: String,
        message: String,
    },
    /// A stage's model directory does not exist.
    #[error("{file}: stage `{stage}`, field `model`: model directory `{path}` does not exist or is not a directory")]
    ModelMissing {
        file: String,
        stage: String,
        path: String,
    },
    /// A stage's model directory has no config.json (nor, for a diffusers pipeline folder,
    /// model_index.json).
    #[error("{file}: stage `{stage}`, field `model`: model directory `{path}` has no {expected}")]
    ModelNoConfig {
        file: String,
        stage: String,
        path: String,
        /// The file(s) a model folder of this stage holds.
        expected: String,
    },
}
