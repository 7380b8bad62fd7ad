//! Where the small-rows linear kernel beats candle's matmul: `x · Wᵀ` for the shapes of the
//! ~100M benchmark model's layers at 1..1024 rows, the kernel on weights packed once, both timed back to back in one run.
//!
//! Run: `cargo run --release -p omnistage-benches --example linear_rows`

use candle_core::{Device, Tensor};
use omnistage_engines::kernels::matmul::{PackedLinearOp, PackedWeight};
use std::sync::Arc;
use std::time::Instant;

fn time<T>(reps: usize, weights: &[T], f: impl Fn(&T)) -> f64 {
    let t = Instant::now();
    for _ in 0..reps {
        weights.iter().for_each(&f);
    }
    t.elapsed().as_secs_f64() / (reps * weights.len()) as f64
}

fn main() {
    let dev = Device::Cpu;
    println!("in x out   rows   candle us  kernel us  speedup  kernel GB/s of weights");
    for (i, o) in [(768usize, 3072usize), (3072, 768), (768, 768)] {
        // Several distinct weights, so each call streams its weight from memory as in a model.
        let ws: Vec<Tensor> = (0..20)
            .map(|_| Tensor::randn(0f32, 1., (o, i), &dev).expect("weight"))
            .collect();
        let ops: Vec<PackedLinearOp> = ws
            .iter()
            .map(|w| PackedLinearOp(Arc::new(PackedWeight::from_tensors(w, None).expect("pack"))))
            .collect();
        for m in [1usize, 4, 8, 16, 32, 64, 128, 256] {
            let x = Tensor::randn(0f32, 1., (m, i), &dev).expect("input");
            let reps = if m >= 128 { 1 } else { 4 };
            let c = time(reps, &ws, |w| {
                x.matmul(&w.t().expect("t")).expect("matmul");
            });
            let k = time(reps, &ops, |op| {
                x.apply_op1_no_bwd(op).expect("kernel");
            });
            println!(
                "{i:>4}x{o:<5} {m:>5} {:>11.1} {:>10.1} {:>8.2} {:>8.1}",
                c * 1e6,
                k * 1e6,
                c / k,
                (i * o * 4) as f64 / k / 1e9
            );
        }
    }
}
