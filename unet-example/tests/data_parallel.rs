//! Data-parallel training on a group of threads against one process: two ranks, each
//! with half of every global batch, must train the same weights as one process on the
//! whole batches (within f32 rounding: the gradients are averaged in another order), with
//! the Lovász-Softmax per batch taken over the global batch. Group norm, so that no
//! per-rank batch statistics enter, or batch norm synchronised over the ranks. And a
//! global batch that the ranks do not divide is an error, as is synchronised batch norm
//! without ranks.

use std::sync::Arc;

use candle::Device;
use lovasz_candle::distributed::LocalGroup;
use unet_example::model::{Layers, Norm};
use unet_example::train::{DataParallel, RunOptions, Schedule, TrainConfig, Trainer};

fn config() -> TrainConfig {
    TrainConfig {
        dataset: "shapes:32:16".to_string(),
        schedule: Schedule::CeThenFinetune,
        epochs: 2,
        finetune_epochs: 1,
        lr: 1e-2,
        batch_size: 4,
        depth: 3,
        base_width: 4,
        norm: Norm::Group { groups: 2 },
        seed: 5,
        ..Default::default()
    }
}

fn quiet() -> RunOptions {
    RunOptions {
        progress: false,
        ..Default::default()
    }
}

/// [`quiet`] on candle's layers.
fn quiet_candle() -> RunOptions {
    RunOptions {
        layers: Some(Layers::Candle),
        ..quiet()
    }
}

#[test]
fn two_ranks_train_the_weights_of_one_process() {
    for per_image in [false, true] {
        two_ranks_against_one(
            TrainConfig {
                per_image,
                ..config()
            },
            quiet,
        );
    }
}

/// On candle's layers, where the one process's batch norm and the synchronised one are
/// the same operations: the fused layers' batch norm rounds differently, and after AdamW's
/// first steps (a step of ±lr whatever the size of the gradient) gradients of almost 0
/// that round to opposite signs leave weights 1e-2 apart (the unit test in `model::norm`
/// checks the synchronised batch norm on the fused layers' layout).
#[test]
fn two_ranks_with_synchronised_batch_norm_train_the_weights_of_one_process() {
    let cfg = TrainConfig {
        norm: Norm::Batch,
        sync_bn: true,
        ..config()
    };
    two_ranks_against_one(cfg, quiet_candle);
}

#[test]
fn synchronised_batch_norm_without_ranks_is_an_error() {
    let cfg = TrainConfig {
        norm: Norm::Batch,
        sync_bn: true,
        ..config()
    };
    let mut t = Trainer::new(cfg, &Device::Cpu, None, quiet()).unwrap();
    let err = t.run_until(1).unwrap_err().to_string();
    assert!(err.contains("--ranks N or under mpirun"), "{err}");
}

/// Two ranks on `cfg` against one process on `cfg` without synchronised batch norm (the
/// one process's batch norm is over the whole batch).
fn two_ranks_against_one(cfg: TrainConfig, options: fn() -> RunOptions) {
    let single = TrainConfig {
        sync_bn: false,
        ..cfg.clone()
    };
    let mut one = Trainer::new(single, &Device::Cpu, None, options()).unwrap();
    one.run_until(2).unwrap();
    let want = one.model().tensors().unwrap();
    let ranks = LocalGroup::new(2).unwrap();
    let got: Vec<_> = std::thread::scope(|s| {
        let threads: Vec<_> = ranks
            .into_iter()
            .map(|g| {
                let cfg = cfg.clone();
                s.spawn(move || {
                    let parallel = DataParallel::new(Arc::new(g));
                    let mut t = Trainer::new(cfg, &Device::Cpu, None, options())
                        .unwrap()
                        .data_parallel(parallel)
                        .unwrap();
                    t.run_until(2).unwrap();
                    (t.model().tensors().unwrap(), t.history().to_vec())
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for (rank, (tensors, history)) in got.iter().enumerate() {
        for (name, w) in &want {
            let g = &tensors[name];
            let diff = (g - w).unwrap().abs().unwrap().max_all().unwrap();
            let scale = w.abs().unwrap().max_all().unwrap();
            let (diff, scale) = (
                diff.to_scalar::<f32>().unwrap(),
                scale.to_scalar::<f32>().unwrap(),
            );
            assert!(
                diff <= 1e-4 * scale.max(1e-2),
                "per_image {}: rank {rank}: {name}: differs by {diff} (scale {scale})",
                cfg.per_image
            );
        }
        for (g, w) in history.iter().zip(one.history()) {
            assert!(
                (g.loss - w.loss).abs() <= 1e-4 * w.loss,
                "rank {rank}: loss {} vs {}",
                g.loss,
                w.loss
            );
            assert_eq!(g.lovasz.is_some(), w.lovasz.is_some());
        }
        assert!(
            history[1].lovasz.is_some(),
            "the second epoch fine-tunes with the Lovász-Softmax"
        );
    }
    // Only rank 0 validates.
    assert!(got[0].1[1].val_miou.is_some() && got[1].1[1].val_miou.is_none());
}

#[test]
fn a_global_batch_the_ranks_do_not_divide_is_an_error() {
    let cfg = TrainConfig {
        batch_size: 3,
        ..config()
    };
    let mut ranks = LocalGroup::new(2).unwrap();
    let g = ranks.remove(0);
    let err = Trainer::new(cfg, &Device::Cpu, None, quiet())
        .unwrap()
        .data_parallel(DataParallel::new(Arc::new(g)))
        .err()
        .expect("an error")
        .to_string();
    assert!(err.contains("multiple of the 2 ranks"), "{err}");
}
