//! Mimi checkpoint layouts and the name map between them.
//!
//! candle's `models::mimi` reads the **Transformers** layout, the one of `kyutai/mimi`'s
//! `model.safetensors` (`decoder.layers.N.conv.weight`, `decoder_transformer.layers.L.self_attn
//! .q_proj.weight`, `quantizer.semantic_residual_vector_quantizer.layers.0.codebook.embed_sum`,
//! …), so that layout is memory-mapped as it is.
//!
//! The original **moshi** single-file layout (`tokenizer-e351c8d8-checkpoint125.safetensors`:
//! `decoder.model.N.conv.conv.weight`, fused `self_attn.in_proj_weight`,
//! `quantizer.rvq_first.vq.layers.0._codebook.embedding_sum`, …) is renamed with the rules of
//! Transformers' `convert_mimi_checkpoint_to_pytorch.py`, applied in the same order, and its
//! fused `in_proj_weight` is split into q/k/v with q and k permuted from moshi's interleaved
//! RoPE pairs to the rotate-half layout, exactly as that script does. Only the decoder half is
//! read from a moshi file.

use crate::audio::codec::CodecError;
use crate::llm::weights::mmap_var_builder;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::PathBuf;

/// Which tensor-name layout a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointLayout {
    /// Transformers' `MimiModel` names (`kyutai/mimi` `model.safetensors`); what candle reads.
    Transformers,
    /// The original moshi names (`tokenizer-e351c8d8-checkpoint125.safetensors`).
    Moshi,
}

/// The rename rules of Transformers' Mimi conversion script, in its order; every rule whose
/// source occurs in the (already partly renamed) name is applied.
const MOSHI_TO_TRANSFORMERS: [(&str, &str); 23] = [
    ("conv.conv.conv", "conv"),
    ("convtr.convtr.convtr", "conv"),
    ("conv.conv", "conv"),
    ("convtr.convtr", "conv"),
    (
        "quantizer.rvq_first.vq",
        "quantizer.semantic_residual_vector_quantizer",
    ),
    (
        "quantizer.rvq_first",
        "quantizer.semantic_residual_vector_quantizer",
    ),
    (
        "quantizer.rvq_rest.vq",
        "quantizer.acoustic_residual_vector_quantizer",
    ),
    (
        "quantizer.rvq_rest",
        "quantizer.acoustic_residual_vector_quantizer",
    ),
    ("_codebook", "codebook"),
    ("_initialized", "initialized"),
    ("embedding_sum", "embed_sum"),
    ("encoder.model", "encoder.layers"),
    ("decoder.model", "decoder.layers"),
    ("encoder_transformer.transformer", "encoder_transformer"),
    ("decoder_transformer.transformer", "decoder_transformer"),
    ("linear1", "mlp.fc1"),
    ("linear2", "mlp.fc2"),
    ("self_attn.out_projs.0", "self_attn.o_proj"),
    ("self_attn.out_proj", "self_attn.o_proj"),
    ("norm1", "input_layernorm"),
    ("norm2", "post_attention_layernorm"),
    ("layer_scale_1", "self_attn_layer_scale"),
    ("layer_scale_2", "mlp_layer_scale"),
];

/// Renames a moshi tensor name to the Transformers layout (fused q/k/v keep their suffix).
pub fn moshi_to_transformers_name(name: &str) -> String {
    let mut out = name.to_string();
    for (from, to) in MOSHI_TO_TRANSFORMERS {
        if out.contains(from) {
            out = out.replace(from, to);
        }
    }
    out
}

/// Whether the tensor names are the moshi layout.
fn is_moshi(names: &[String]) -> bool {
    names.iter().any(|n| {
        n.starts_with("decoder.model.")
            || n.starts_with("quantizer.rvq_first.")
            || n.starts_with("decoder_transformer.transformer.")
    })
}

/// The tensors the decoder reads, after renaming.
fn decoder_tensor(name: &str) -> bool {
    [
        "quantizer.",
        "upsample.",
        "decoder_transformer.",
        "decoder.",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

/// Undoes moshi's interleaved RoPE pairs for one of q/k (`[heads·head_dim, dim]`), as the
/// conversion script's `permute`: `view(h, hd/2, 2, dim).transpose(1, 2).reshape(h·hd, dim)`.
fn permute_rope(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    w.reshape((heads, rows / heads / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// Opens the checkpoint `files` as a [`VarBuilder`] in the Transformers layout, renaming a
/// moshi-layout file on the way; returns the layout found.
pub(crate) fn open(
    files: Vec<PathBuf>,
    heads: usize,
    dtype: DType,
    device: &Device,
) -> Result<(VarBuilder<'static>, CheckpointLayout), CodecError> {
    let load = |e: candle_core::Error| CodecError::Load(format!("{files:?}: {e}"));
    // SAFETY: the checkpoint is a read-only input that nothing in this program writes; see
    // `mmap_var_builder`. The headers are validated against the mapped length.
    let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(load)?;
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    if !is_moshi(&names) {
        let vb = mmap_var_builder(files.clone(), dtype, device)
            .map_err(|e| CodecError::Load(e.to_string()))?;
        return Ok((vb, CheckpointLayout::Transformers));
    }
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for name in &names {
        let new = moshi_to_transformers_name(name);
        if !decoder_tensor(&new) {
            continue;
        }
        let t = st.load(name, &Device::Cpu).map_err(load)?;
        let fused = ["in_proj_weight", "in_projs.0.weight"]
            .iter()
            .find(|s| new.ends_with(*s));
        if let Some(suffix) = fused {
            let stem = &new[..new.len() - suffix.len()];
            let qkv = t.to_dtype(DType::F32).map_err(load)?;
            let rows = qkv.dim(0).map_err(load)?;
            if rows % 3 != 0 {
                return Err(CodecError::Load(format!(
                    "{name}: {rows} rows are not q, k and v"
                )));
            }
            let d = rows / 3;
            let part = |i: usize| qkv.narrow(0, i * d, d);
            let q = part(0)
                .and_then(|q| permute_rope(&q, heads))
                .map_err(load)?;
            let k = part(1)
                .and_then(|k| permute_rope(&k, heads))
                .map_err(load)?;
            let v = part(2).map_err(load)?;
            map.insert(format!("{stem}q_proj.weight"), q);
            map.insert(format!("{stem}k_proj.weight"), k);
            map.insert(format!("{stem}v_proj.weight"), v);
        } else {
            map.insert(new, t);
        }
    }
    let mut converted = HashMap::with_capacity(map.len());
    for (name, t) in map {
        let t = t.to_dtype(dtype).and_then(|t| t.to_device(device));
        converted.insert(name, t.map_err(load)?);
    }
    Ok((
        VarBuilder::from_tensors(converted, dtype, device),
        CheckpointLayout::Moshi,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moshi_names_map_like_the_conversion_script() {
        let cases = [
            (
                "decoder.model.0.conv.conv.weight",
                "decoder.layers.0.conv.weight",
            ),
            (
                "decoder.model.2.convtr.convtr.bias",
                "decoder.layers.2.conv.bias",
            ),
            (
                "decoder.model.3.block.1.conv.conv.weight",
                "decoder.layers.3.block.1.conv.weight",
            ),
            (
                "upsample.convtr.convtr.convtr.weight",
                "upsample.conv.weight",
            ),
            ("downsample.conv.conv.conv.weight", "downsample.conv.weight"),
            (
                "quantizer.rvq_first.vq.layers.0._codebook._initialized",
                "quantizer.semantic_residual_vector_quantizer.layers.0.codebook.initialized",
            ),
            (
                "quantizer.rvq_rest.vq.layers.4._codebook.embedding_sum",
                "quantizer.acoustic_residual_vector_quantizer.layers.4.codebook.embed_sum",
            ),
            (
                "quantizer.rvq_rest.output_proj.weight",
                "quantizer.acoustic_residual_vector_quantizer.output_proj.weight",
            ),
            (
                "decoder_transformer.transformer.layers.1.self_attn.out_proj.weight",
                "decoder_transformer.layers.1.self_attn.o_proj.weight",
            ),
            (
                "decoder_transformer.transformer.layers.1.linear2.weight",
                "decoder_transformer.layers.1.mlp.fc2.weight",
            ),
            (
                "decoder_transformer.transformer.layers.0.norm1.bias",
                "decoder_transformer.layers.0.input_layernorm.bias",
            ),
            (
                "decoder_transformer.transformer.layers.0.layer_scale_2.scale",
                "decoder_transformer.layers.0.mlp_layer_scale.scale",
            ),
        ];
        for (moshi, hf) in cases {
            assert_eq!(moshi_to_transformers_name(moshi), hf);
        }
    }

    #[test]
    fn rope_permutation_moves_pairs_to_halves() {
        // One head of dim 4, one column: rows [a0, b0, a1, b1] → [a0, a1, b0, b1].
        let w = Tensor::new(&[[0f32], [1.], [2.], [3.]], &Device::Cpu).unwrap();
        let p = permute_rope(&w, 1).unwrap().flatten_all().unwrap();
        assert_eq!(p.to_vec1::<f32>().unwrap(), vec![0., 2., 1., 3.]);
    }
}
