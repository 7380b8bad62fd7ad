//! Autoregressive LLMs of the Llama / Qwen2 / Qwen3 family with a KV cache and position per
//! sequence, so sequences join and leave a running batch at any step. The engine keeps K/V in a
//! paged pool (`paged`) whose blocks the scheduler crate's block manager hands out.

pub mod chat_template;
pub mod config;
pub mod engine;
pub(crate) mod generation;
pub mod generation_config;
mod kv;
mod linear;
pub mod model;
pub mod paged;
mod paged_ops;
pub(crate) mod prompt;
pub mod sampling;
mod sequence;
pub mod splice;
pub mod stop;
pub mod talker;
pub mod tokenizer;
pub mod weights;
