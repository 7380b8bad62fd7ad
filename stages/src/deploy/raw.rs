//! Reading the TOML file through the `config` crate and turning its tree into typed specs, field by
//! field, so every error can name the stage (or edge) and the field.
//!
//! The raw structs mirror the file one to one: every field optional (defaults are applied while
//! converting) and `deny_unknown_fields`, so a typo never passes silently.

use super::fields::{at_least_one, bad, byte_size, names, one_of, parse_table, required, FieldTy};
use super::{
    env, join, DType, DeployError, DeployGraph, DeviceSpec, EdgeSpec, EncoderSettings,
    ImageSettings, MediaLimits, Site, StageKind, StageSpec, StreamSpec,
};
use super::{ConnectorKind, Modality, PayloadKind, SamplingParams};
use config::{Config, File, FileFormat};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::Path;

/// The keys of a `[[stage]]` table and their types.
pub(super) const STAGE_FIELDS: &[(&str, FieldTy)] = &[
    ("id", FieldTy::Str),
    ("kind", FieldTy::Str),
    ("model", FieldTy::Str),
    ("dtype", FieldTy::Str),
    ("device", FieldTy::Str),
    ("replicas", FieldTy::UInt),
    ("max_batch_size", FieldTy::UInt),
    ("max_batched_tokens", FieldTy::UInt),
    ("max_wait_ms", FieldTy::UInt),
    ("max_queue", FieldTy::UInt),
    ("max_model_len", FieldTy::UInt),
    ("kv_cache_bytes", FieldTy::Str),
    ("kv_block_size", FieldTy::UInt),
    ("prefix_caching", FieldTy::Bool),
    ("outputs", FieldTy::CsvList),
    ("sampling", FieldTy::Table),
    ("image", FieldTy::Table),
    ("talker", FieldTy::Table),
    ("encoder", FieldTy::Table),
    ("process", FieldTy::Bool),
    ("remote", FieldTy::Bool),
    ("router", FieldTy::Table),
    ("mot", FieldTy::Table),
];

/// The keys of a `[stage.sampling]` table and their types.
pub(super) const SAMPLING_FIELDS: &[(&str, FieldTy)] = &[
    ("temperature", FieldTy::Float),
    ("top_p", FieldTy::Float),
    ("top_k", FieldTy::UInt),
    ("seed", FieldTy::UInt),
    ("max_tokens", FieldTy::UInt),
    ("repetition_penalty", FieldTy::Float),
    ("stop", FieldTy::StrList),
    ("stop_token_ids", FieldTy::UIntList),
    ("ignore_eos", FieldTy::Bool),
];

const TOP_FIELDS: &[&str] = &["name", "stage", "edge", "outputs", "media", "cluster"];
const EDGE_FIELDS: &[&str] = &["from", "to", "carries", "connector", "stream"];
const STREAM_FIELDS: &[&str] = &["chunk", "buffer"];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTop {
    name: Option<String>,
    stage: Option<Vec<Value>>,
    edge: Option<Vec<Value>>,
    outputs: Option<Map<String, Value>>,
    media: Option<Map<String, Value>>,
    cluster: Option<Map<String, Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStage {
    id: Option<String>,
    kind: Option<String>,
    model: Option<String>,
    dtype: Option<String>,
    device: Option<String>,
    replicas: Option<usize>,
    max_batch_size: Option<usize>,
    max_batched_tokens: Option<usize>,
    max_wait_ms: Option<u64>,
    max_queue: Option<usize>,
    max_model_len: Option<usize>,
    kv_cache_bytes: Option<Value>,
    kv_block_size: Option<usize>,
    prefix_caching: Option<bool>,
    outputs: Option<Vec<String>>,
    sampling: Option<Map<String, Value>>,
    image: Option<Map<String, Value>>,
    talker: Option<Map<String, Value>>,
    encoder: Option<Map<String, Value>>,
    process: Option<bool>,
    remote: Option<bool>,
    router: Option<Map<String, Value>>,
    mot: Option<Map<String, Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSampling {
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    seed: Option<u64>,
    max_tokens: Option<usize>,
    repetition_penalty: Option<f32>,
    stop: Option<Vec<String>>,
    stop_token_ids: Option<Vec<u32>>,
    ignore_eos: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEdge {
    from: Option<String>,
    to: Option<String>,
    carries: Option<String>,
    connector: Option<String>,
    stream: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStream {
    chunk: Option<usize>,
    buffer: Option<usize>,
}

/// Parses `text` as TOML with the `config` crate, applies the environment overrides in `env` with
/// `set_override`, and returns the merged tree.
pub(super) fn read_tree(
    text: &str,
    file: &str,
    env: &[(String, String)],
) -> Result<Value, DeployError> {
    let syntax = |e: config::ConfigError| DeployError::Syntax {
        file: file.to_string(),
        message: e.to_string(),
    };
    let builder = || Config::builder().add_source(File::from_str(text, FileFormat::Toml));
    let base: Value = builder()
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(syntax)?;
    let overrides = env::overrides(&base, env, file)?;
    if overrides.is_empty() {
        return Ok(base);
    }
    let mut b = builder();
    for o in overrides {
        b = b
            .set_override(&o.key, o.value)
            .map_err(|e| DeployError::Override {
                file: file.to_string(),
                var: o.var.clone(),
                message: e.to_string(),
            })?;
    }
    b.build().and_then(|c| c.try_deserialize()).map_err(syntax)
}

/// Converts the merged tree into a graph with defaults applied (structure not yet validated).
pub(super) fn build_graph(
    tree: &Value,
    file: &str,
    base_dir: &Path,
) -> Result<DeployGraph, DeployError> {
    let empty = Map::new();
    let top_map = tree.as_object().unwrap_or(&empty);
    for key in ["stage", "edge"] {
        if top_map.get(key).is_some_and(Value::is_object) {
            let message = format!("expected an array of tables: write [[{key}]], not [{key}]");
            return Err(bad(file, &Site::Top, key, &message));
        }
    }
    let top: RawTop = parse_table(top_map, file, &Site::Top, "", TOP_FIELDS)?;
    let stages = (top.stage.unwrap_or_default().iter().enumerate())
        .map(|(i, v)| stage(i + 1, v, file, base_dir))
        .collect::<Result<Vec<_>, _>>()?;
    let edges = (top.edge.unwrap_or_default().iter().enumerate())
        .map(|(i, v)| edge(i + 1, v, file))
        .collect::<Result<Vec<_>, _>>()?;
    let mut outputs = Vec::new();
    for (key, value) in top.outputs.unwrap_or_default() {
        let modality = match key.as_str() {
            "text" => Modality::Text,
            "image" => Modality::Image,
            "audio" => Modality::Audio,
            _ => {
                return Err(DeployError::UnknownModality {
                    file: file.to_string(),
                    key,
                })
            }
        };
        let Value::String(id) = value else {
            return Err(bad(
                file,
                &Site::Outputs,
                &format!("outputs.{key}"),
                "expected a stage id (a string)",
            ));
        };
        outputs.push((modality, id));
    }
    outputs.sort();
    let media = match top.media {
        Some(m) => super::media::parse_limits(&m, file)?,
        None => MediaLimits::default(),
    };
    let name = top.name.unwrap_or_default();
    let cluster = top
        .cluster
        .map(|c| super::cluster::parse_cluster(&c, file, base_dir, &name))
        .transpose()?;
    Ok(DeployGraph {
        source: file.into(),
        name,
        cluster,
        stages,
        edges,
        outputs,
        media,
    })
}

fn stage(n: usize, value: &Value, file: &str, base_dir: &Path) -> Result<StageSpec, DeployError> {
    let Some(map) = value.as_object() else {
        return Err(bad(
            file,
            &Site::StageAt(n),
            "stage",
            "expected a table ([[stage]])",
        ));
    };
    let site = match map.get("id").and_then(Value::as_str) {
        Some(id) if !id.trim().is_empty() => Site::Stage(id.to_string()),
        _ => Site::StageAt(n),
    };
    let r: RawStage = parse_table(map, file, &site, "", &names(STAGE_FIELDS))?;
    if r.process == Some(true) && r.remote == Some(true) {
        return Err(bad(
            file,
            &site,
            "remote",
            "a stage is either `process = true` (a child worker of the gateway) or `remote = true` \
             (workers started elsewhere), not both",
        ));
    }
    let id = required(r.id, file, &site, "id")?;
    if id.trim().is_empty() {
        return Err(bad(file, &site, "id", "the stage id must not be empty"));
    }
    let kind_s = required(r.kind, file, &site, "kind")?;
    let kind = one_of(
        &kind_s,
        &StageKind::ALL,
        |k| k.as_str(),
        file,
        &site,
        "kind",
    )?;
    // A rule-form router has no model; every other stage needs one.
    let rule_router = kind == StageKind::Router
        && r.router
            .as_ref()
            .is_some_and(|m| m.contains_key("rules") || m.contains_key("default"));
    let model = match r.model {
        None if rule_router => String::new(),
        model => required(model, file, &site, "model")?,
    };
    if model.trim().is_empty() && !rule_router {
        return Err(bad(
            file,
            &site,
            "model",
            "the model path must not be empty",
        ));
    }
    let model = if model.is_empty() || Path::new(&model).is_absolute() {
        model.into()
    } else {
        base_dir.join(model)
    };
    let dtype = match r.dtype {
        Some(d) => one_of(&d, &DType::ALL, |d| d.as_str(), file, &site, "dtype")?,
        None => DType::default(),
    };
    let device = match r.device {
        Some(d) => d
            .parse::<DeviceSpec>()
            .map_err(|_| DeployError::UnknownDevice {
                file: file.to_string(),
                site: Box::new(site.clone()),
                field: "device".into(),
                value: d,
            })?,
        None => DeviceSpec::default(),
    };
    let outputs_given = r.outputs.is_some();
    let mut outputs = match r.outputs {
        Some(list) => {
            let mut out = Vec::new();
            for p in &list {
                let p = one_of(p, &PayloadKind::ALL, |k| k.as_str(), file, &site, "outputs")?;
                if !kind.produces().contains(&p) {
                    return Err(DeployError::KindCannotProduce {
                        file: file.to_string(),
                        stage: id.clone(),
                        kind,
                        payload: p,
                        allowed: join(kind.produces()),
                    });
                }
                if !out.contains(&p) {
                    out.push(p);
                }
            }
            if out.is_empty() {
                return Err(bad(
                    file,
                    &site,
                    "outputs",
                    "must list at least one payload kind",
                ));
            }
            out
        }
        None => kind.default_outputs(),
    };
    let sampling = match r.sampling {
        Some(m) => sampling(&m, file, &site)?,
        None => SamplingParams::default(),
    };
    let image = match r.image {
        Some(m) => super::image::parse(&m, file, &site)?,
        None => ImageSettings::default(),
    };
    let talker = r
        .talker
        .map(|m| super::talker::parse(&m, file, &site))
        .transpose()?;
    if talker.is_some() && kind != StageKind::Llm {
        return Err(bad(
            file,
            &site,
            "talker",
            &format!("only llm stages speak; this stage is {kind}"),
        ));
    }
    let encoder = match r.encoder {
        Some(m) if kind == StageKind::Encoder => super::media::parse_encoder(&m, file, &site)?,
        Some(_) => {
            return Err(bad(
                file,
                &site,
                "encoder",
                &format!("only encoder stages take an [stage.encoder] table; this stage is {kind}"),
            ))
        }
        None => EncoderSettings::default(),
    };
    if kind == StageKind::Encoder {
        let media = encoder.encodes != Modality::Text;
        if media && !outputs_given {
            outputs = vec![PayloadKind::MediaEmbeddings];
        }
        if media != outputs.contains(&PayloadKind::MediaEmbeddings) || (media && outputs.len() > 1)
        {
            let message = if media {
                format!(
                    "an encoder of {} produces only `media_embeddings`",
                    encoder.encodes
                )
            } else {
                "`media_embeddings` come from an image or audio encoder: set [stage.encoder] encodes = \"image\" or \"audio\"".to_string()
            };
            return Err(bad(file, &site, "outputs", &message));
        }
    }
    let router = match r.router {
        Some(m) if kind == StageKind::Router => {
            Some(super::router::parse_router(&m, !rule_router, file, &site)?)
        }
        Some(_) => {
            return Err(bad(
                file,
                &site,
                "router",
                &format!("only router stages take a [stage.router] table; this stage is {kind}"),
            ))
        }
        None => None,
    };
    let mot = match r.mot {
        Some(m) if kind == StageKind::Llm && talker.is_none() => {
            Some(super::router::parse_mot(&m, file, &site)?)
        }
        Some(_) => {
            return Err(bad(
                file,
                &site,
                "mot",
                "only text llm stages (no [stage.talker]) are Mixture-of-Thoughts experts",
            ))
        }
        None => None,
    };
    if talker.is_some() && !outputs_given {
        // A talker writes codec tokens: their ids, and the frames they make.
        outputs = vec![PayloadKind::Tokens, PayloadKind::Codes];
    }
    if talker.is_none() && outputs.contains(&PayloadKind::Codes) {
        return Err(bad(
            file,
            &site,
            "outputs",
            "codes come from a talker: add a [stage.talker] table saying how its tokens map to codec codes",
        ));
    }
    let (batch, tokens) = (
        r.max_batch_size.unwrap_or(32),
        r.max_batched_tokens.unwrap_or(2048),
    );
    if tokens >= 1 && tokens < batch {
        return Err(bad(
            file,
            &site,
            "max_batched_tokens",
            &format!(
                "{tokens} is less than max_batch_size ({batch}): every running request needs a \
                 token of the step budget; raise it or lower max_batch_size"
            ),
        ));
    }
    Ok(StageSpec {
        kind,
        model,
        dtype,
        device,
        replicas: at_least_one(r.replicas.unwrap_or(1), file, &site, "replicas")?,
        max_batch_size: at_least_one(
            r.max_batch_size.unwrap_or(32),
            file,
            &site,
            "max_batch_size",
        )?,
        max_batched_tokens: at_least_one(
            r.max_batched_tokens.unwrap_or(2048),
            file,
            &site,
            "max_batched_tokens",
        )?,
        max_wait_ms: r.max_wait_ms.unwrap_or(0),
        max_queue: at_least_one(r.max_queue.unwrap_or(256), file, &site, "max_queue")?,
        max_model_len: r
            .max_model_len
            .map(|v| at_least_one(v, file, &site, "max_model_len"))
            .transpose()?,
        kv_cache_bytes: r
            .kv_cache_bytes
            .map(|v| byte_size(&v).map_err(|message| bad(file, &site, "kv_cache_bytes", &message)))
            .transpose()?,
        kv_block_size: at_least_one(r.kv_block_size.unwrap_or(16), file, &site, "kv_block_size")?,
        prefix_caching: r.prefix_caching.unwrap_or(true),
        outputs,
        sampling,
        image,
        talker,
        encoder,
        process: r.process.unwrap_or(false),
        remote: r.remote.unwrap_or(false),
        router,
        mot,
        id,
    })
}

fn sampling(
    map: &Map<String, Value>,
    file: &str,
    site: &Site,
) -> Result<SamplingParams, DeployError> {
    let r: RawSampling = parse_table(map, file, site, "sampling.", &names(SAMPLING_FIELDS))?;
    let range = |field: &str, value: String, rule: &'static str| DeployError::OutOfRange {
        file: file.to_string(),
        site: Box::new(site.clone()),
        field: field.to_string(),
        value,
        rule,
    };
    if let Some(t) = r.temperature {
        if !(t.is_finite() && t >= 0.0) {
            return Err(range("sampling.temperature", t.to_string(), ">= 0"));
        }
    }
    if let Some(p) = r.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(range("sampling.top_p", p.to_string(), "in (0, 1]"));
        }
    }
    if let Some(p) = r.repetition_penalty {
        if !(p.is_finite() && p > 0.0) {
            return Err(range("sampling.repetition_penalty", p.to_string(), "> 0"));
        }
    }
    if r.max_tokens == Some(0) {
        return Err(range("sampling.max_tokens", "0".into(), ">= 1"));
    }
    Ok(SamplingParams {
        temperature: r.temperature,
        top_p: r.top_p,
        top_k: r.top_k,
        seed: r.seed,
        max_tokens: r.max_tokens,
        repetition_penalty: r.repetition_penalty,
        stop: r.stop.unwrap_or_default(),
        stop_token_ids: r.stop_token_ids.unwrap_or_default(),
        ignore_eos: r.ignore_eos.unwrap_or(false),
    })
}

fn edge(n: usize, value: &Value, file: &str) -> Result<EdgeSpec, DeployError> {
    let Some(map) = value.as_object() else {
        let site = Site::Edge {
            index: n,
            from: "?".into(),
            to: "?".into(),
        };
        return Err(bad(file, &site, "edge", "expected a table ([[edge]])"));
    };
    let end = |k: &str| {
        map.get(k)
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string()
    };
    let site = Site::Edge {
        index: n,
        from: end("from"),
        to: end("to"),
    };
    let r: RawEdge = parse_table(map, file, &site, "", EDGE_FIELDS)?;
    let from = required(r.from, file, &site, "from")?;
    let to = required(r.to, file, &site, "to")?;
    let carries = required(r.carries, file, &site, "carries")?;
    let carries = one_of(
        &carries,
        &PayloadKind::ALL,
        |k| k.as_str(),
        file,
        &site,
        "carries",
    )?;
    let connector = match r.connector {
        Some(c) => one_of(
            &c,
            &ConnectorKind::ALL,
            |c| c.as_str(),
            file,
            &site,
            "connector",
        )?,
        None => ConnectorKind::default(),
    };
    let stream = match r.stream {
        None | Some(Value::Bool(false)) => None,
        Some(Value::Bool(true)) => Some(StreamSpec {
            chunk: 1,
            buffer: StreamSpec::DEFAULT_BUFFER,
        }),
        Some(Value::Object(m)) => {
            let s: RawStream = parse_table(&m, file, &site, "stream.", STREAM_FIELDS)?;
            Some(StreamSpec {
                chunk: at_least_one(s.chunk.unwrap_or(1), file, &site, "stream.chunk")?,
                buffer: at_least_one(
                    s.buffer.unwrap_or(StreamSpec::DEFAULT_BUFFER),
                    file,
                    &site,
                    "stream.buffer",
                )?,
            })
        }
        Some(_) => {
            return Err(bad(
                file,
                &site,
                "stream",
                "expected a table like { chunk = 1 } or a boolean",
            ))
        }
    };
    Ok(EdgeSpec {
        from,
        to,
        carries,
        connector,
        stream,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;

    /// The field tables (used for unknown-field messages and env overrides) must name exactly
    /// the raw structs' fields.
    fn covers<T: DeserializeOwned>(fields: &[&str]) {
        for f in fields {
            let mut m = Map::new();
            m.insert(f.to_string(), Value::Null);
            assert!(
                serde_json::from_value::<T>(Value::Object(m)).is_ok(),
                "field {f}"
            );
        }
        let mut m = Map::new();
        m.insert("not_a_field".into(), Value::Null);
        assert!(serde_json::from_value::<T>(Value::Object(m)).is_err());
    }

    #[test]
    fn field_tables_match_raw_structs() {
        covers::<RawTop>(TOP_FIELDS);
        covers::<RawStage>(&names(STAGE_FIELDS));
        covers::<RawSampling>(&names(SAMPLING_FIELDS));
        covers::<RawEdge>(EDGE_FIELDS);
        covers::<RawStream>(STREAM_FIELDS);
    }
}
