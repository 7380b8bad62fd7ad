//! The interface the DiT stage drives: a denoising transformer split into embedding, block stack
//! and head, so step caching can skip the block stack for some rows of a batch.

use super::DiffusionError;
use candle_core::Tensor;

/// One batched denoiser call. Every row shares the latent shape; all tensors are f32 on the
/// model's device (the model casts to its own dtype inside).
pub struct DenoiseInput<'a> {
    /// `[B, C, H, W]` noisy latents.
    pub latents: &'a Tensor,
    /// `[B]` flow-matching sigmas in `[0, 1]` (1 = pure noise); each model scales them to the
    /// timestep convention it was trained with.
    pub sigmas: &'a Tensor,
    /// `[B, L, context_dim]` text-token conditioning.
    pub context: &'a Tensor,
    /// `[B, pooled_dim]` pooled text conditioning (ignored by models without one).
    pub pooled: &'a Tensor,
    /// `[B]` distilled guidance strength, for models with a guidance embedding (FLUX-dev).
    pub guidance: Option<&'a Tensor>,
}

/// Static facts about a denoiser that the stage needs to prepare inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct DenoiserInfo {
    /// Architecture name, for logs and `omnistage check` (`"sd3"`, `"flux"`).
    pub architecture: &'static str,
    /// Latent channels in and out.
    pub latent_channels: usize,
    /// Latent height and width must be multiples of this (the patch size).
    pub latent_multiple: usize,
    /// Width of each text-token row the model takes.
    pub context_dim: usize,
    /// Width of the pooled text vector (0 when the model takes none).
    pub pooled_dim: usize,
    /// Whether the model embeds a distilled guidance scale instead of using classifier-free
    /// guidance (FLUX-dev).
    pub guidance_embedding: bool,
    /// Largest latent side the model's position embedding covers (`None` = unbounded, e.g.
    /// rotary embeddings).
    pub max_latent_side: Option<usize>,
}

/// A diffusion transformer as the DiT stage drives it. `forward` is `head(embed → blocks)`;
/// the pieces are exposed so step caching can reuse a row's block-stack residual.
pub trait Denoiser: Send + 'static {
    /// Per-batch state between the pieces (embedded image and text streams, conditioning
    /// vector, positional tables).
    type Embedded;

    fn info(&self) -> &DenoiserInfo;

    /// Embeds a batch: patchify + positions for the image stream, the text stream, and the
    /// timestep/pooled conditioning vector.
    fn embed(&self, input: &DenoiseInput<'_>) -> Result<Self::Embedded, DiffusionError>;

    /// The rows `rows` (indices into the batch) of an embedded batch, in that order.
    fn select_rows(
        &self,
        embedded: &Self::Embedded,
        rows: &[usize],
    ) -> Result<Self::Embedded, DiffusionError>;

    /// `[B, T, D]` the first block's timestep-modulated image input (`norm(x) * (1 + scale) +
    /// shift`): step caching compares it between steps to decide whether to reuse a residual.
    fn modulated_input(&self, embedded: &Self::Embedded) -> Result<Tensor, DiffusionError>;

    /// `[B, T, D]` the image stream entering the block stack.
    fn stack_input(&self, embedded: &Self::Embedded) -> Result<Tensor, DiffusionError>;

    /// Runs the block stack; returns the image stream leaving it, `[B, T, D]`.
    fn run_blocks(&self, embedded: &Self::Embedded) -> Result<Tensor, DiffusionError>;

    /// Final norm/projection and unpatchify: the `[B, C, H, W]` f32 velocity prediction from
    /// the block stack's output `hidden` (`[B, T, D]`).
    fn head(&self, embedded: &Self::Embedded, hidden: &Tensor) -> Result<Tensor, DiffusionError>;

    /// The whole forward: `[B, C, H, W]` f32 velocity.
    fn forward(&self, input: &DenoiseInput<'_>) -> Result<Tensor, DiffusionError> {
        let embedded = self.embed(input)?;
        let hidden = self.run_blocks(&embedded)?;
        self.head(&embedded, &hidden)
    }
}
