//! Audio codecs: codec codes → PCM, one-shot and streamed.
//!
//! Every codec implements [`codec::Codec`]; the codec stage engine drives any of them.

pub mod codec;
pub mod mimi;
pub mod snac;
pub mod stage;
