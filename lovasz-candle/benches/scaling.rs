//! How the cost of the Lovász-Softmax (forward + backward, per batch) grows with the
//! number of pixels `P = B·H·W` and classes `C`. Throughput is reported in
//! pixels·classes per second. `cargo bench -p lovasz-candle`.
//!
//! Grid: P ∈ {10⁴, 10⁵, 10⁶, 10⁷} × C ∈ {2, 21, 150}, without the points whose input
//! alone would exceed 1 GB (P·C > 2.5·10⁸: only 10⁷ × 150).

use candle::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lovasz_candle::{lovasz_softmax, LovaszSoftmaxConfig};

const MAX_ELEMS: usize = 250_000_000;

fn inputs(p: usize, c: usize) -> candle::Result<(Tensor, Tensor)> {
    let dev = Device::Cpu;
    // Uniform probabilities independent of uniform labels: the worst case for the sort.
    let probas = Tensor::rand(0f32, 1., (1, c, p), &dev)?;
    let labels = Tensor::rand(0f32, c as f32, (1, p), &dev)?
        .floor()?
        .clamp(0f32, (c - 1) as f32)?
        .to_dtype(DType::U32)?;
    Ok((probas, labels))
}

fn scaling(crit: &mut Criterion) {
    let mut group = crit.benchmark_group("lovasz_softmax_fwd_bwd");
    group.sample_size(10);
    for &p in &[10_000usize, 100_000, 1_000_000, 10_000_000] {
        for &c in &[2usize, 21, 150] {
            if p * c > MAX_ELEMS {
                continue;
            }
            let (probas, labels) = match inputs(p, c) {
                Ok(v) => v,
                Err(e) => panic!("inputs P={p} C={c}: {e}"),
            };
            let var = match Var::from_tensor(&probas) {
                Ok(v) => v,
                Err(e) => panic!("{e}"),
            };
            let cfg = LovaszSoftmaxConfig::default();
            group.throughput(Throughput::Elements((p * c) as u64));
            group.bench_with_input(BenchmarkId::new(format!("C={c}"), p), &p, |b, _| {
                b.iter(|| {
                    let loss = lovasz_softmax(var.as_tensor(), &labels, &cfg);
                    loss.and_then(|l| l.backward())
                        .map(|g| g.get(&var).is_some())
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, scaling);
criterion_main!(benches);
