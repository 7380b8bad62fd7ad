//! Rendering a graph for people: a plain-text summary and a Graphviz DOT digraph.

use super::{join, DeployGraph, EdgeSpec, Modality, PayloadKind, SamplingParams, StageKind};
use std::fmt::Write;

/// The text summary behind [`DeployGraph::to_text`].
pub(super) fn text(g: &DeployGraph) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "deployment `{}` ({})", g.name, g.source.display());
    let _ = writeln!(out, "stages ({}):", g.stages.len());
    for s in &g.stages {
        let mut inbound = g.inbound(&s.id).peekable();
        let entry = if inbound.peek().is_none() {
            "  [entry]"
        } else if inbound.all(|e| e.carries == PayloadKind::MediaEmbeddings) {
            "  [entry; after its media encoders when a request carries media]"
        } else {
            ""
        };
        let _ = writeln!(out, "  {} ({}){entry}", s.id, s.kind);
        let _ = writeln!(out, "    model:    {}", s.model.display());
        let _ = writeln!(
            out,
            "    device:   {}  dtype: {}  replicas: {}  process: {}",
            s.device,
            s.dtype,
            if s.remote {
                "as discovered".to_string()
            } else {
                s.replicas.to_string()
            },
            if s.remote {
                "remote workers (etcd)"
            } else if s.process {
                "own worker"
            } else {
                "in-process"
            }
        );
        let max_len = s
            .max_model_len
            .map_or_else(|| "model default".to_string(), |l| l.to_string());
        let _ = writeln!(
            out,
            "    batching: max_batch_size={} max_batched_tokens={} max_wait_ms={} max_queue={} max_model_len={max_len}",
            s.max_batch_size, s.max_batched_tokens, s.max_wait_ms, s.max_queue
        );
        // A Mixture-of-Thoughts expert keeps its own per-request caches (no paged pool).
        if s.kind == StageKind::Llm && s.mot.is_none() {
            let budget = s.kv_cache_bytes.map_or_else(
                || "sized from batching limits".to_string(),
                |b| format!("{b} bytes"),
            );
            let _ = writeln!(
                out,
                "    kv cache: {budget}, blocks of {} tokens, prefix caching {}",
                s.kv_block_size,
                if s.prefix_caching { "on" } else { "off" }
            );
        }
        let _ = writeln!(out, "    outputs:  {}", join(&s.outputs));
        let i = &s.image;
        match s.kind {
            StageKind::Dit => {
                let _ = writeln!(
                    out,
                    "    image:    sizes {}..={} (default {}x{}) n<={} steps {} (max {}) guidance {} step_cache={} (threshold {})",
                    i.min_size, i.max_size, i.default_width, i.default_height, i.max_n,
                    i.default_steps, i.max_steps, i.default_guidance_scale, i.step_cache,
                    i.step_cache_threshold
                );
            }
            StageKind::Encoder if s.encoder.encodes != Modality::Text => {
                let _ = writeln!(
                    out,
                    "    encodes:  the request's {} input, embedding cache {} bytes",
                    s.encoder.encodes, s.encoder.cache_bytes
                );
            }
            StageKind::Encoder => {
                let _ = writeln!(out, "    text:     padded to {} tokens", i.max_text_tokens);
            }
            _ => {}
        }
        if let Some(r) = &s.router {
            let how = match &r.form {
                super::RouterForm::Model => "scored by the model".to_string(),
                super::RouterForm::Rules { rules, default } => {
                    let rules: Vec<String> = rules.iter().map(|r| r.text()).collect();
                    format!("rules [{}], default {default}", rules.join("; "))
                }
            };
            let _ = writeln!(
                out,
                "    routes:   top-{} of [{}], {how}",
                r.k,
                r.experts.join(", ")
            );
        }
        if let Some(m) = &s.mot {
            let _ = writeln!(
                out,
                "    mot:      expert `{}` of this Mixture-of-Thoughts checkpoint; collaborates \
                 with the other experts its router selects",
                m.expert
            );
        }
        if let Some(t) = &s.talker {
            let _ = writeln!(
                out,
                "    talker:   frames of {} codec tokens (levels {:?}) from id {}, codebooks of {}, ends at {:?}",
                t.frame_layout.len(),
                t.frame_layout,
                t.codec_token_offset,
                t.codebook_size,
                t.end_token_ids
            );
            let _ = writeln!(out, "    voices:   {}", t.voice_names());
        }
        let sampling = sampling_text(&s.sampling);
        if !sampling.is_empty() {
            let _ = writeln!(out, "    sampling: {sampling}");
        }
    }
    let _ = writeln!(out, "edges ({}):", g.edges.len());
    for (i, e) in g.edges.iter().enumerate() {
        let stream = e.stream.map_or_else(
            || "not streamed".to_string(),
            |s| format!("stream chunk={} buffer={}", s.chunk, s.buffer),
        );
        let _ = writeln!(
            out,
            "  #{} {} -> {}  carries={} connector={} {stream}",
            i + 1,
            e.from,
            e.to,
            e.carries,
            e.connector
        );
    }
    let _ = writeln!(out, "outputs:");
    for (m, id) in &g.outputs {
        match g.stage(id).and_then(|s| s.router.as_ref()) {
            Some(r) => {
                let _ = writeln!(
                    out,
                    "  {m} <- the primary expert `{id}` selects ({})",
                    r.experts.join(" | ")
                );
            }
            None => {
                let _ = writeln!(out, "  {m} <- {id}");
            }
        }
    }
    let inputs: Vec<String> = [Modality::Image, Modality::Audio]
        .into_iter()
        .filter(|m| g.takes_media(*m))
        .map(|m| m.to_string())
        .collect();
    if !inputs.is_empty() {
        let l = &g.media;
        let _ = writeln!(
            out,
            "media inputs: {} (images <= {} bytes, <= {} pixels; audio <= {} bytes, <= {} s; <= {} per request; URL fetching {})",
            inputs.join(", "),
            l.max_image_bytes,
            l.max_image_pixels,
            l.max_audio_bytes,
            l.max_audio_seconds,
            l.max_items,
            match (l.fetch_urls, l.fetch_private_addresses) {
                (false, _) => "off",
                (true, false) => "on, public addresses only",
                (true, true) => "on, private addresses too",
            }
        );
    }
    if let Some(c) = &g.cluster {
        let _ = writeln!(
            out,
            "cluster: etcd {} under {} (lease {} s); secret {}",
            c.etcd.join(", "),
            c.prefix,
            c.lease_ttl.as_secs(),
            c.secret_file.as_ref().map_or_else(
                || format!("from {}", super::SECRET_ENV),
                |p| p.display().to_string()
            )
        );
    }
    out
}

/// The sampling defaults that are set, as `key=value` pairs.
fn sampling_text(p: &SamplingParams) -> String {
    let mut parts = Vec::new();
    let mut opt = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            parts.push(format!("{k}={v}"));
        }
    };
    opt("temperature", p.temperature.map(|v| v.to_string()));
    opt("top_p", p.top_p.map(|v| v.to_string()));
    opt("top_k", p.top_k.map(|v| v.to_string()));
    opt("seed", p.seed.map(|v| v.to_string()));
    opt("max_tokens", p.max_tokens.map(|v| v.to_string()));
    opt(
        "repetition_penalty",
        p.repetition_penalty.map(|v| v.to_string()),
    );
    opt(
        "stop",
        (!p.stop.is_empty()).then(|| format!("{:?}", p.stop)),
    );
    opt(
        "stop_token_ids",
        (!p.stop_token_ids.is_empty()).then(|| format!("{:?}", p.stop_token_ids)),
    );
    opt("ignore_eos", p.ignore_eos.then(|| "true".to_string()));
    parts.join(" ")
}

/// The DOT digraph behind [`DeployGraph::to_dot`]: one box per stage (`id` and kind), one arrow
/// per edge (payload, connector, stream chunk), one ellipse per output modality.
pub(super) fn dot(g: &DeployGraph) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph {} {{", quote(&g.name));
    let _ = writeln!(out, "  rankdir=LR;");
    let _ = writeln!(out, "  node [shape=box];");
    for s in &g.stages {
        let label = format!("{}\n{}", s.id, s.kind);
        let _ = writeln!(out, "  {} [label={}];", quote(&s.id), quote(&label));
    }
    for e in &g.edges {
        let _ = writeln!(
            out,
            "  {} -> {} [label={}];",
            quote(&e.from),
            quote(&e.to),
            quote(&edge_label(e))
        );
    }
    for (m, id) in &g.outputs {
        let mut sink = format!("output:{m}");
        while g.stage(&sink).is_some() {
            sink.insert(0, '_');
        }
        let _ = writeln!(
            out,
            "  {} [shape=ellipse, style=dashed, label={}];",
            quote(&sink),
            quote(m.as_str())
        );
        let _ = writeln!(out, "  {} -> {} [style=dashed];", quote(id), quote(&sink));
    }
    out.push_str("}\n");
    out
}

fn edge_label(e: &EdgeSpec) -> String {
    let mut label = format!("{}\n{}", e.carries, e.connector);
    if let Some(s) = e.stream {
        let _ = write!(label, ", stream chunk={}", s.chunk);
    }
    label
}

/// A DOT double-quoted string; newlines become `\n` line breaks.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            '\r' => {}
            c => q.push(c),
        }
    }
    q.push('"');
    q
}
