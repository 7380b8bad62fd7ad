//! Dedicated CPU kernels for the LLM forward, where candle's general ops cost more in dispatch,
//! packing and copies than the arithmetic they do: small-batch matmul against pre-packed weights
//! and attention read straight from the paged KV pool.

pub mod attention;
pub mod matmul;
