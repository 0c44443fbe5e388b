//! The distributed per-batch losses on a group of threads ([`LocalGroup`]) against one
//! process over the whole batch: each rank holds a shard of the batch (in rank order), and
//! its value must be the whole batch's loss and its gradient that loss's gradient on its
//! shard, bit for bit, in f32 and f64; with void pixels, classes absent from some ranks,
//! errors tied across ranks, both layouts, class lists and weights. Per-image losses must
//! not communicate, and ranks that disagree or leave must fail, not hang.

use candle::{DType, Device, Tensor, Var};
use lovasz_candle::distributed::{self, LocalGroup, ProcessGroup, ReduceBuffer};
use lovasz_candle::{
    lovasz_hinge, lovasz_sigmoid, lovasz_softmax, lovasz_softmax_with_logits, Classes,
    LovaszHingeConfig, LovaszSigmoidConfig, LovaszSoftmaxConfig, Reduction,
};

mod common;

use common::{flat, problem, Result};

type Loss<'a> =
    &'a (dyn Fn(&Tensor, &Tensor, Option<&dyn ProcessGroup>) -> candle::Result<Tensor> + Sync);

/// Value and gradient of `loss` on `x`.
fn value_and_grad(
    x: &Tensor,
    f: impl Fn(&Tensor) -> candle::Result<Tensor>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let var = Var::from_tensor(x)?;
    let out = f(var.as_tensor())?;
    let grads = out.sum_all()?.backward()?;
    let g = grads.get(&var).expect("a gradient");
    Ok((flat(&out)?, flat(g)?))
}

/// Runs `loss` on the whole batch in one process and on `world` ranks, each with its
/// shard of `x` and `labels` (split along dim 0), and checks values and gradient slices.
fn check(what: &str, x: &Tensor, labels: &Tensor, world: usize, loss: Loss) -> Result<()> {
    let (whole, whole_grad) = value_and_grad(x, |x| loss(x, labels, None))?;
    let b = x.dim(0)? / world;
    let ranks = on_ranks(world, |g| -> Result<_> {
        let x = x.narrow(0, g.rank() * b, b)?.contiguous()?;
        let labels = labels.narrow(0, g.rank() * b, b)?.contiguous()?;
        value_and_grad(&x, |x| loss(x, &labels, Some(&g)))
    })?;
    let per_rank = whole_grad.len() / world;
    for (r, out) in ranks.into_iter().enumerate() {
        let (value, grad) = out?;
        assert_eq!(value.len(), whole.len(), "{what}: rank {r}: shape");
        for (v, w) in value.iter().zip(&whole) {
            assert!(
                (v - w).abs() <= 1e-6 * w.abs().max(1e-3) || (v.is_nan() && w.is_nan()),
                "{what}: rank {r}: loss {v} vs {w}"
            );
        }
        let want = &whole_grad[r * per_rank..(r + 1) * per_rank];
        for (i, (g, w)) in grad.iter().zip(want).enumerate() {
            assert!(g == w, "{what}: rank {r}: gradient {i}: {g} vs {w}");
        }
    }
    Ok(())
}

/// Labels where class `absent` appears only in the first half of the batch.
fn without_class_in_second_half(labels: &Tensor, absent: u32) -> Result<Tensor> {
    let dims = labels.dims().to_vec();
    let half = labels.elem_count() / 2;
    let mut v: Vec<u32> = labels.flatten_all()?.to_vec1()?;
    for l in v[half..].iter_mut() {
        if *l == absent {
            *l = 0;
        }
    }
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

/// Probabilities over `classes` on `levels` steps (many errors tied across ranks), or
/// continuous with `levels = 0`.
fn probabilities(x: &Tensor, levels: u32) -> Result<Tensor> {
    let p = candle_nn::ops::softmax(x, 1)?;
    Ok(if levels == 0 {
        p
    } else {
        (p * f64::from(levels))?
            .floor()?
            .affine(1.0 / f64::from(levels), 0.0)?
    })
}

#[test]
fn the_softmax_over_every_rank_is_the_whole_batch_loss() -> Result<()> {
    for (world, seed) in [(2, 1), (3, 2), (4, 3)] {
        let (x, labels) = problem(&[2 * world, 4, 6, 5], &[2 * world, 6, 5], 4, seed)?;
        let labels = without_class_in_second_half(&labels, 3)?;
        for dtype in [DType::F32, DType::F64] {
            for levels in [0, 8] {
                let p = probabilities(&x, levels)?.to_dtype(dtype)?;
                for (classes, weights) in [
                    (Classes::Present, None),
                    (Classes::All, Some(vec![1.0, 2.0, 0.5, 1.0])),
                    (Classes::List(vec![3, 1, 3]), None),
                ] {
                    let cfg = LovaszSoftmaxConfig {
                        classes: classes.clone(),
                        per_image: false,
                        ignore_index: Some(255),
                        class_weights: weights,
                        ..Default::default()
                    };
                    let what = format!("softmax {world} {dtype:?} {levels} {classes:?}");
                    check(&what, &p, &labels, world, &|x, l, g| match g {
                        Some(g) => distributed::lovasz_softmax(x, l, &cfg, g),
                        None => lovasz_softmax(x, l, &cfg),
                    })?;
                }
            }
            let z = x.to_dtype(dtype)?;
            let cfg = LovaszSoftmaxConfig {
                per_image: false,
                ignore_index: Some(255),
                reduction: Reduction::None,
                ..Default::default()
            };
            check(
                &format!("logits {world} {dtype:?}"),
                &z,
                &labels,
                world,
                &|x, l, g| match g {
                    Some(g) => distributed::lovasz_softmax_with_logits(x, l, &cfg, g),
                    None => lovasz_softmax_with_logits(x, l, &cfg),
                },
            )?;
            // Channels last: [B, H, W, C].
            let last = probabilities(&x, 0)?
                .permute((0, 2, 3, 1))?
                .contiguous()?
                .to_dtype(dtype)?;
            let cfg = LovaszSoftmaxConfig {
                per_image: false,
                ignore_index: Some(255),
                channels_last: true,
                ..Default::default()
            };
            check(
                &format!("channels last {world} {dtype:?}"),
                &last,
                &labels,
                world,
                &|x, l, g| match g {
                    Some(g) => distributed::lovasz_softmax(x, l, &cfg, g),
                    None => lovasz_softmax(x, l, &cfg),
                },
            )?;
        }
    }
    Ok(())
}

#[test]
fn the_binary_losses_over_every_rank_are_the_whole_batch_loss() -> Result<()> {
    for (world, seed) in [(2, 4), (3, 5)] {
        let (x, labels) = problem(&[2 * world, 7, 9], &[2 * world, 7, 9], 2, seed)?;
        for dtype in [DType::F32, DType::F64] {
            for levels in [0.0, 4.0] {
                let x = if levels > 0.0 {
                    (x.clone() * levels)?.round()?.affine(1.0 / levels, 0.0)?
                } else {
                    x.clone()
                }
                .to_dtype(dtype)?;
                let cfg = LovaszHingeConfig {
                    per_image: false,
                    ignore_index: Some(255),
                    ..Default::default()
                };
                check(
                    &format!("hinge {world} {dtype:?} {levels}"),
                    &x,
                    &labels,
                    world,
                    &|x, l, g| match g {
                        Some(g) => distributed::lovasz_hinge(x, l, &cfg, g),
                        None => lovasz_hinge(x, l, &cfg),
                    },
                )?;
                let p = candle_nn::ops::sigmoid(&x)?;
                let cfg = LovaszSigmoidConfig {
                    per_image: false,
                    ignore_index: Some(255),
                    ..Default::default()
                };
                check(
                    &format!("sigmoid {world} {dtype:?} {levels}"),
                    &p,
                    &labels,
                    world,
                    &|x, l, g| match g {
                        Some(g) => distributed::lovasz_sigmoid(x, l, &cfg, g),
                        None => lovasz_sigmoid(x, l, &cfg),
                    },
                )?;
            }
        }
    }
    Ok(())
}

/// A group whose every collective fails: a loss that communicates cannot use it.
struct NoCalls;

impl ProcessGroup for NoCalls {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        2
    }
    fn all_gather(&self, _: &[u8]) -> candle::Result<Vec<Vec<u8>>> {
        candle::bail!("communicated")
    }
    fn all_reduce_sum(&self, _: ReduceBuffer<'_>) -> candle::Result<()> {
        candle::bail!("communicated")
    }
    fn broadcast(&self, _: &mut Vec<u8>, _: usize) -> candle::Result<()> {
        candle::bail!("communicated")
    }
}

#[test]
fn per_image_losses_are_local_and_do_not_communicate() -> Result<()> {
    let (x, labels) = problem(&[2, 3, 4, 4], &[2, 4, 4], 3, 9)?;
    let p = candle_nn::ops::softmax(&x, 1)?;
    let cfg = LovaszSoftmaxConfig {
        per_image: true,
        ignore_index: Some(255),
        ..Default::default()
    };
    let got = distributed::lovasz_softmax(&p, &labels, &cfg, &NoCalls)?;
    assert_eq!(flat(&got)?, flat(&lovasz_softmax(&p, &labels, &cfg)?)?);
    let got = distributed::lovasz_softmax_with_logits(&x, &labels, &cfg, &NoCalls)?;
    assert_eq!(
        flat(&got)?,
        flat(&lovasz_softmax_with_logits(&x, &labels, &cfg)?)?
    );
    let (z, bl) = problem(&[2, 4, 4], &[2, 4, 4], 2, 10)?;
    let hc = LovaszHingeConfig {
        ignore_index: Some(255),
        ..Default::default()
    };
    let got = distributed::lovasz_hinge(&z, &bl, &hc, &NoCalls)?;
    assert_eq!(flat(&got)?, flat(&lovasz_hinge(&z, &bl, &hc)?)?);
    // Per batch, the same group is used, and fails.
    let cfg = LovaszSoftmaxConfig {
        per_image: false,
        ..cfg
    };
    let err = distributed::lovasz_softmax(&p, &labels, &cfg, &NoCalls).unwrap_err();
    assert!(err.to_string().contains("communicated"), "{err}");
    Ok(())
}

/// `f` on each of `world` ranks (threads of this process), the results in rank order.
fn on_ranks<T: Send>(world: usize, f: impl Fn(LocalGroup) -> T + Sync) -> Result<Vec<T>> {
    let groups = LocalGroup::new(world)?;
    Ok(std::thread::scope(|s| {
        let threads: Vec<_> = (groups.into_iter())
            .map(|g| {
                let f = &f;
                s.spawn(move || f(g))
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }))
}

#[test]
fn ranks_that_disagree_or_leave_get_errors_not_hangs() -> Result<()> {
    let cfg = LovaszSoftmaxConfig {
        per_image: false,
        ignore_index: Some(255),
        ..Default::default()
    };
    // The loss of rank `r`'s batch of `c` classes, labels in `dtype`.
    let loss = |g: &LocalGroup, c: usize, dtype: DType| {
        let (x, labels) = problem(&[2, c, 4, 4], &[2, 4, 4], 3, 1).unwrap();
        let p = candle_nn::ops::softmax(&x, 1).unwrap();
        let labels = labels.to_dtype(dtype).unwrap();
        distributed::lovasz_softmax(&p, &labels, &cfg, g).map_err(|e| e.to_string())
    };
    // Rank 1 has 4 classes, rank 0 has 3.
    let errs = on_ranks(2, |g| loss(&g, 3 + g.rank(), DType::U32).unwrap_err())?;
    for e in &errs {
        assert!(e.contains("differs") && e.contains("[2, 3, 16]"), "{e}");
    }
    // Rank 1's labels are u8, rank 0's u32.
    let errs = on_ranks(2, |g| {
        loss(&g, 3, [DType::U32, DType::U8][g.rank()]).unwrap_err()
    })?;
    let want = [
        "rank 1's labels are u8 and rank 0's u32",
        "rank 0's labels are u32 and rank 1's u8",
    ];
    for (e, w) in errs.iter().zip(want) {
        assert!(e.contains(w), "{e}");
    }
    // Rank 1 stops before the loss: rank 0 fails.
    let errs = on_ranks(2, |g| {
        (g.rank() == 0).then(|| loss(&g, 3, DType::U32).unwrap_err())
    })?;
    let e = errs[0].as_deref().expect("rank 0 fails");
    assert!(e.contains("rank 1 left"), "{e}");
    Ok(())
}

/// Probabilities whose foreground errors are all at least 0.4 while most background
/// errors are below: the background past the union's foreground floor is pruned from the
/// exchange, and the result must not change.
#[test]
fn pruned_background_changes_nothing() -> Result<()> {
    let (x, labels) = problem(&[6, 4, 5, 7], &[6, 5, 7], 4, 21)?;
    let u: Vec<f32> = flat(&x)?.iter().map(|v| ((v + 3.0) / 6.0) as f32).collect();
    let l: Vec<u32> = labels.flatten_all()?.to_vec1()?;
    let (b, c, s) = (6, 4, 35);
    let mut p = vec![0f32; b * c * s];
    for i in 0..b {
        for j in 0..s {
            let y = l[i * s + j];
            let top = 0.2 + 0.4 * u[(i * c) * s + j];
            for k in 0..c {
                let w: f32 = (0..c)
                    .filter(|&m| m as u32 != y)
                    .map(|m| 0.5 + u[(i * c + m) * s + j])
                    .sum();
                p[(i * c + k) * s + j] = if k as u32 == y {
                    top
                } else {
                    (1.0 - top) * (0.5 + u[(i * c + k) * s + j]) / w
                };
            }
        }
    }
    let p = Tensor::from_vec(p, (b, c, 5, 7), &Device::Cpu)?;
    for classes in [Classes::Present, Classes::All] {
        let cfg = LovaszSoftmaxConfig {
            classes,
            per_image: false,
            ignore_index: Some(255),
            ..Default::default()
        };
        for world in [2, 3] {
            check(
                &format!("pruned {world}"),
                &p,
                &labels,
                world,
                &|x, l, g| match g {
                    Some(g) => distributed::lovasz_softmax(x, l, &cfg, g),
                    None => lovasz_softmax(x, l, &cfg),
                },
            )?;
        }
    }
    Ok(())
}
