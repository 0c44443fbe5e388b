//! Times each fused layer, forward + backward, at the shapes of the U-Net example's
//! default model (depth 4, base width 12, batch 4 of 112×96 slices), and prints a hash of
//! the bits of every output and gradient, so that two builds can be compared for
//! bit-identical results as well as for speed.
//!
//!   cargo run --release -p fused-cpu-layers --example op_time [REPS]
//!
//! Each line: the op, its shape, the median and fastest of REPS (default 15) forward +
//! backward passes in ms, less the median time of the harness alone (`Σ y ⊙ r` and its
//! backward on a variable of the output's shape), and `bits=` the FNV-1a hash of the
//! results. The last line sums the medians over the network's layers (each layer counted
//! as often as the U-Net runs it per step).

use std::time::Instant;

use candle::{Device, Tensor, Var};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// FNV-1a over the f32 bits of `tensors`.
fn hash(tensors: &[Tensor]) -> Res<u64> {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for t in tensors {
        for v in t.flatten_all()?.to_vec1::<f32>()? {
            for byte in v.to_bits().to_le_bytes() {
                h = (h ^ byte as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    Ok(h)
}

/// Deterministic values in [-1, 1) (a 64-bit LCG), as a CPU tensor of `dims`.
fn values(seed: u64, dims: &[usize]) -> Res<Tensor> {
    let n: usize = dims.iter().product();
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

/// One layer to time: its inputs (as variables) and how to apply it.
struct Case {
    name: String,
    /// Times the U-Net runs it per step.
    count: usize,
    inputs: Vec<Var>,
    apply: fn(&[Var]) -> candle::Result<Tensor>,
}

impl Case {
    /// One forward + backward of `Σ y ⊙ r`; returns every output and gradient.
    fn run(&self, r: &Tensor) -> Res<Vec<Tensor>> {
        let y = (self.apply)(&self.inputs)?;
        let grads = (&y * r)?.sum_all()?.backward()?;
        let mut out = vec![y];
        for v in &self.inputs {
            out.push(
                grads
                    .get(v.as_tensor())
                    .ok_or("an input without gradient")?
                    .clone(),
            );
        }
        Ok(out)
    }
}

fn conv(v: &[Var]) -> candle::Result<Tensor> {
    fused_cpu_layers::conv3x3(&v[0], &v[1])
}
fn up(v: &[Var]) -> candle::Result<Tensor> {
    fused_cpu_layers::conv_transpose2x2(&v[0], &v[1], &v[2])
}
fn head(v: &[Var]) -> candle::Result<Tensor> {
    fused_cpu_layers::head1x1(&v[0], &v[1], &v[2])
}
fn bn(v: &[Var]) -> candle::Result<Tensor> {
    Ok(fused_cpu_layers::batch_norm_relu(&v[0], &v[1], &v[2], 1e-5)?.0)
}
fn pool(v: &[Var]) -> candle::Result<Tensor> {
    fused_cpu_layers::max_pool2x2(&v[0])
}

fn cases() -> Res<Vec<Case>> {
    let (b, h, w, base, classes) = (4, 112, 96, 12, 15);
    let mut seed = 0;
    let mut var = |dims: &[usize]| -> Res<Var> {
        seed += 1;
        Ok(Var::from_tensor(&values(seed, dims)?)?)
    };
    let mut cases = Vec::new();
    let mut add = |name: String, count, inputs, apply| {
        cases.push(Case {
            name,
            count,
            inputs,
            apply,
        })
    };
    // (in, out, level, times per step): the encoder's two convolutions per level, the
    // decoder's two (the first over the skip concatenated with the up path).
    let convs = [
        (1, base, 0, 1),
        (base, base, 0, 2),
        (base, 2 * base, 1, 1),
        (2 * base, 2 * base, 1, 2),
        (2 * base, 4 * base, 2, 1),
        (4 * base, 4 * base, 2, 2),
        (4 * base, 8 * base, 3, 1),
        (8 * base, 8 * base, 3, 1),
        (8 * base, 4 * base, 2, 1),
        (4 * base, 2 * base, 1, 1),
        (2 * base, base, 0, 1),
    ];
    for (c, o, level, count) in convs {
        let (hl, wl) = (h >> level, w >> level);
        let inputs = vec![var(&[c, b, hl, wl])?, var(&[o, c, 3, 3])?];
        add(format!("conv3x3 {c}->{o} {hl}x{wl}"), count, inputs, conv);
    }
    for level in 0..4 {
        let (c, hl, wl) = (base << level, h >> level, w >> level);
        let inputs = vec![var(&[c, b, hl, wl])?, var(&[c])?, var(&[c])?];
        let count = if level == 3 { 2 } else { 4 };
        add(format!("bn_relu {c} {hl}x{wl}"), count, inputs, bn);
    }
    for level in 0..3 {
        let (c, hl, wl) = (base << level, h >> level, w >> level);
        add(
            format!("max_pool2x2 {c} {hl}x{wl}"),
            1,
            vec![var(&[c, b, hl, wl])?],
            pool,
        );
        let (ci, hi, wi) = (2 * c, hl / 2, wl / 2);
        let inputs = vec![var(&[ci, b, hi, wi])?, var(&[ci, c, 2, 2])?, var(&[c])?];
        add(
            format!("conv_transpose2x2 {ci}->{c} {hi}x{wi}"),
            1,
            inputs,
            up,
        );
    }
    let inputs = vec![
        var(&[base, b, h, w])?,
        var(&[classes, base, 1, 1])?,
        var(&[classes])?,
    ];
    add(
        format!("head1x1 {base}->{classes} {h}x{w}"),
        1,
        inputs,
        head,
    );
    Ok(cases)
}

/// The median and the fastest of `reps` calls of `f`, in ms.
fn median_ms<T>(reps: usize, mut f: impl FnMut() -> Res<T>) -> Res<(f64, f64)> {
    let mut ms: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f().map(|_| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Res<_>>()?;
    ms.sort_by(f64::total_cmp);
    Ok((ms[reps / 2], ms[0]))
}

fn main() -> Res<()> {
    // As the U-Net binary does: candle's element-wise ops on the calling thread (its
    // spinning pool stalls on a shared 2-core machine); the fused layers use rayon.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let reps: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|_| format!("REPS: not a count: {a:?}"))?,
        None => 15,
    };
    if reps == 0 {
        return Err("REPS must be at least 1".into());
    }
    let mut total = 0.0;
    for case in cases()? {
        let y = (case.apply)(&case.inputs)?;
        let r = values(99, y.dims())?;
        let bits = hash(&case.run(&r)?)?;
        let harness = Case {
            name: String::new(),
            count: 0,
            inputs: vec![Var::from_tensor(&y)?],
            apply: |v| Ok(v[0].as_tensor().clone()),
        };
        let base = median_ms(reps, || harness.run(&r))?.0;
        let (median, min) = median_ms(reps, || case.run(&r))?;
        let (median, min) = (median - base, min - base);
        total += median * case.count as f64;
        println!(
            "{:<34} ×{}  median {median:7.3} ms  min {min:7.3} ms  bits={bits:016x}",
            case.name, case.count
        );
    }
    println!("sum over a step's layers (medians × count): {total:.2} ms");
    Ok(())
}
