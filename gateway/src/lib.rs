//! The `omnistage` gateway: the HTTP API (OpenAI-compatible), the orchestrator that walks each
//! request through the stage graph, Prometheus metrics, and the CLI's serving logic.
//!
//! Owns: HTTP, request/response shapes, wiring the graph's stages to their engines and schedulers.
//! Must not know: model internals (it calls `omnistage_engines::factory`), batching policy
//! (`omnistage_scheduler`).

pub mod app;
pub mod audio;
pub mod bench;
pub mod chat;
pub mod images;
pub mod media;
pub mod metrics;
pub mod openai;
pub mod orchestrator;
pub mod pool;
pub mod runtime;
pub mod server;
pub mod trace;
pub mod worker;
