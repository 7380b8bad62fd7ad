//! SNAC's building blocks on candle: weight-normalised convolutions (read in any of the three
//! layouts checkpoints use), the snake activation, residual units and decoder blocks.
//!
//! Weights are read in f32, weight norm is folded once at load (`w = g · v / ‖v‖`, the norm
//! over every axis but the first, as `torch.nn.utils.weight_norm(dim=0)`), then cast to the
//! compute dtype.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv1d, Conv1dConfig, VarBuilder};

/// Reads the weight of a weight-normalised conv under `vb` with the folded shape `shape`:
/// `parametrizations.weight.original0/1` (current torch, what `snac` 1.2 saves and candle
/// reads), `weight_g`/`weight_v` (the legacy hook, as in older `pytorch_model.bin` exports), or
/// a plain `weight` already folded.
pub(super) fn weight_norm(vb: &VarBuilder, shape: (usize, usize, usize)) -> Result<Tensor> {
    let names = [
        (
            "parametrizations.weight.original0",
            "parametrizations.weight.original1",
        ),
        ("weight_g", "weight_v"),
    ];
    for (g_name, v_name) in names {
        if vb.contains_tensor(v_name) {
            let g = vb.get((shape.0, 1, 1), g_name)?;
            let v = vb.get(shape, v_name)?;
            let norm = v.sqr()?.sum_keepdim((1, 2))?.sqrt()?;
            return v.broadcast_mul(&g)?.broadcast_div(&norm);
        }
    }
    vb.get(shape, "weight")
}

/// A 1-d convolution with "same" padding (`pad = dilation · (kernel - 1) / 2`): dense through
/// candle, or depthwise (one filter per channel) as `kernel` shifted multiply-adds, which is
/// much faster than candle's per-group loop.
#[derive(Debug, Clone)]
pub(super) struct Conv {
    kind: ConvKind,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum ConvKind {
    Dense(Conv1d),
    /// Each tap as a `(1, C, 1)` tensor.
    Depthwise {
        taps: Vec<Tensor>,
        dilation: usize,
        pad: usize,
    },
}

/// Shape and options of one [`Conv`].
#[derive(Debug, Clone, Copy)]
pub(super) struct ConvSpec {
    pub cin: usize,
    pub cout: usize,
    pub kernel: usize,
    pub dilation: usize,
    /// `1` or `cin == cout` (depthwise).
    pub depthwise: bool,
    pub bias: bool,
}

impl ConvSpec {
    pub fn new(cin: usize, cout: usize, kernel: usize) -> Self {
        Self {
            cin,
            cout,
            kernel,
            dilation: 1,
            depthwise: false,
            bias: true,
        }
    }
}

impl Conv {
    pub fn load(spec: ConvSpec, dtype: DType, vb: VarBuilder) -> Result<Self> {
        let cin_per_group = if spec.depthwise { 1 } else { spec.cin };
        let weight = weight_norm(&vb, (spec.cout, cin_per_group, spec.kernel))?.to_dtype(dtype)?;
        let bias = if spec.bias {
            Some(vb.get(spec.cout, "bias")?.to_dtype(dtype)?)
        } else {
            None
        };
        let pad = spec.dilation * (spec.kernel - 1) / 2;
        let kind = if spec.depthwise {
            let taps = (0..spec.kernel)
                .map(|k| weight.narrow(2, k, 1)?.reshape((1, spec.cout, 1)))
                .collect::<Result<Vec<_>>>()?;
            ConvKind::Depthwise {
                taps,
                dilation: spec.dilation,
                pad,
            }
        } else {
            let cfg = Conv1dConfig {
                padding: pad,
                dilation: spec.dilation,
                ..Default::default()
            };
            ConvKind::Dense(Conv1d::new(weight, None, cfg))
        };
        Ok(Self { kind, bias })
    }
}

impl Module for Conv {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = match &self.kind {
            ConvKind::Dense(conv) => xs.apply(conv)?,
            ConvKind::Depthwise {
                taps,
                dilation,
                pad,
            } => {
                let t = xs.dim(2)?;
                let padded = xs.pad_with_zeros(2, *pad, *pad)?;
                let mut acc: Option<Tensor> = None;
                for (k, tap) in taps.iter().enumerate() {
                    let term = padded.narrow(2, k * dilation, t)?.broadcast_mul(tap)?;
                    acc = Some(match acc {
                        None => term,
                        Some(a) => (a + term)?,
                    });
                }
                acc.ok_or_else(|| candle_core::Error::Msg("depthwise conv with no taps".into()))?
            }
        };
        match &self.bias {
            Some(b) => ys.broadcast_add(&b.reshape((1, (), 1))?),
            None => Ok(ys),
        }
    }
}

/// `x + sin²(αx) / (α + 1e-9)`, per channel.
#[derive(Debug, Clone)]
pub(super) struct Snake {
    alpha: Tensor,
    inv_alpha: Tensor,
}

impl Snake {
    pub fn load(channels: usize, dtype: DType, vb: VarBuilder) -> Result<Self> {
        let alpha = vb.get((1, channels, 1), "alpha")?;
        let inv_alpha = (&alpha + 1e-9)?.recip()?.to_dtype(dtype)?;
        Ok(Self {
            alpha: alpha.to_dtype(dtype)?,
            inv_alpha,
        })
    }
}

impl Module for Snake {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let sin = xs.broadcast_mul(&self.alpha)?.sin()?;
        xs + sin.sqr()?.broadcast_mul(&self.inv_alpha)?
    }
}

/// `x + conv1x1(snake(conv7_dilated(snake(x))))`.
#[derive(Debug, Clone)]
pub(super) struct ResidualUnit {
    snake1: Snake,
    conv1: Conv,
    snake2: Snake,
    conv2: Conv,
}

impl ResidualUnit {
    pub fn load(
        dim: usize,
        dilation: usize,
        depthwise: bool,
        dtype: DType,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vb = vb.pp("block");
        let conv1 = ConvSpec {
            dilation,
            depthwise,
            ..ConvSpec::new(dim, dim, 7)
        };
        Ok(Self {
            snake1: Snake::load(dim, dtype, vb.pp(0))?,
            conv1: Conv::load(conv1, dtype, vb.pp(1))?,
            snake2: Snake::load(dim, dtype, vb.pp(2))?,
            conv2: Conv::load(ConvSpec::new(dim, dim, 1), dtype, vb.pp(3))?,
        })
    }
}

impl Module for ResidualUnit {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = xs
            .apply(&self.snake1)?
            .apply(&self.conv1)?
            .apply(&self.snake2)?
            .apply(&self.conv2)?;
        xs + ys
    }
}

/// SNAC's upsampler: `ConvTranspose1d(cin, cout, kernel 2s, stride s, padding ceil(s/2),
/// output_padding s % 2)`, `T` steps in, `T·s` out.
///
/// Computed as one matmul and an overlap-add: every input step `m` contributes
/// `Σ_c x[c, m] · w[c, :, k]` to unpadded position `m·s + k`, `k < 2s`; the first `s` taps land
/// in step `m`'s own stride, the last `s` in the next one's; the padding crops `[pad, pad + T·s)`.
/// candle's CPU transposed conv runs a direct loop when padded (an order of magnitude slower
/// at SNAC's widths), and its fast unpadded path mixes up batch elements in 0.11.1.
#[derive(Debug, Clone)]
pub(super) struct Upsample {
    /// `(cin, cout · 2s)`.
    weight: Tensor,
    bias: Tensor,
    cout: usize,
    stride: usize,
}

impl Upsample {
    pub fn load(
        cin: usize,
        cout: usize,
        stride: usize,
        dtype: DType,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            weight: weight_norm(&vb, (cin, cout, 2 * stride))?
                .reshape((cin, cout * 2 * stride))?
                .to_dtype(dtype)?,
            bias: vb
                .get(cout, "bias")?
                .to_dtype(dtype)?
                .reshape((1, cout, 1))?,
            cout,
            stride,
        })
    }
}

impl Module for Upsample {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, cin, t) = xs.dims3()?;
        let (s, cout) = (self.stride, self.cout);
        // (B·T, cin) @ (cin, cout·2s) → (B, T, cout, 2, s).
        let cols = xs
            .transpose(1, 2)?
            .reshape((b * t, cin))?
            .matmul(&self.weight)?
            .reshape((b, t, cout, 2, s))?;
        // Each half as (B, cout, T·s): step m's taps at m·s + k.
        let half = |i: usize| -> Result<Tensor> {
            cols.narrow(3, i, 1)?
                .squeeze(3)?
                .permute((0, 2, 1, 3))?
                .reshape((b, cout, t * s))
        };
        let full = (half(0)?.pad_with_zeros(2, 0, s)? + half(1)?.pad_with_zeros(2, s, 0)?)?;
        full.narrow(2, s.div_ceil(2), t * s)?
            .broadcast_add(&self.bias)
    }
}

/// Snake, `stride`× transposed conv, optional noise, then residual units with dilations 1, 3
/// and 9.
#[derive(Debug, Clone)]
pub(super) struct DecoderBlock {
    snake: Snake,
    up: Upsample,
    /// The noise block's bias-free 1×1 conv: `x + noise · linear(x)`.
    noise: Option<Conv>,
    res: [ResidualUnit; 3],
}

impl DecoderBlock {
    pub fn load(
        cin: usize,
        cout: usize,
        stride: usize,
        noise: bool,
        depthwise: bool,
        dtype: DType,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vb = vb.pp("block");
        let up = Upsample::load(cin, cout, stride, dtype, vb.pp(1))?;
        let n = usize::from(noise);
        let noise = if noise {
            let spec = ConvSpec {
                bias: false,
                ..ConvSpec::new(cout, cout, 1)
            };
            Some(Conv::load(spec, dtype, vb.pp(2).pp("linear"))?)
        } else {
            None
        };
        let res = [
            ResidualUnit::load(cout, 1, depthwise, dtype, vb.pp(2 + n))?,
            ResidualUnit::load(cout, 3, depthwise, dtype, vb.pp(3 + n))?,
            ResidualUnit::load(cout, 9, depthwise, dtype, vb.pp(4 + n))?,
        ];
        Ok(Self {
            snake: Snake::load(cin, dtype, vb.pp(0))?,
            up,
            noise,
            res,
        })
    }

    /// Whether the block injects noise (then `forward` needs a `(B, 1, T·stride)` noise).
    pub fn has_noise(&self) -> bool {
        self.noise.is_some()
    }

    pub fn forward(&self, xs: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let mut xs = xs.apply(&self.snake)?.apply(&self.up)?;
        if let (Some(linear), Some(noise)) = (&self.noise, noise) {
            let h = xs.apply(linear)?;
            xs = (&xs + h.broadcast_mul(noise)?)?;
        }
        for unit in &self.res {
            xs = xs.apply(unit)?;
        }
        Ok(xs)
    }
}
