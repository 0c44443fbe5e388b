//! End-to-end runs on tiny synthetic data (32×32 shapes, a narrow U-Net, a few steps):
//! training, the run folder's files, checkpoint round trips, resumption, `compare`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle::Device;
use datasets::{Dataset, Split};
use unet_example::cli::load_run;
use unet_example::data::{open_split, DataSpec};
use unet_example::eval::{confusion, predict_samples};
use unet_example::model::{Layers, UNet};
use unet_example::train::checkpoint::{
    CONFIG_FILE, CURVES_FILE, METRICS_FILE, MODEL_FILE, PREDICTIONS_FILE, STATE_FILE, SUMMARY_FILE,
};
use unet_example::train::{EpochRecord, Outcome, RunOptions, Schedule, TrainConfig, Trainer};

fn tiny(schedule: Schedule) -> TrainConfig {
    TrainConfig {
        dataset: "shapes:32:16".to_string(),
        schedule,
        epochs: 4,
        finetune_epochs: 2,
        lr: 1e-2,
        batch_size: 4,
        depth: 3,
        base_width: 4,
        seed: 3,
        ..Default::default()
    }
}

fn quiet() -> RunOptions {
    RunOptions {
        progress: false,
        prediction_images: 3,
        ..Default::default()
    }
}

/// One finished run shared by the tests that only read it.
fn finished_run() -> &'static Path {
    static RUN: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, dir) = RUN.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let mut t = Trainer::new(
            tiny(Schedule::CeThenFinetune),
            &Device::Cpu,
            Some(&dir),
            quiet(),
        )
        .unwrap();
        assert!(matches!(t.run().unwrap(), Outcome::Finished(_)));
        (tmp, dir)
    });
    dir
}

#[test]
fn training_lowers_the_loss_and_writes_every_file() {
    let dir = finished_run();
    for f in [
        CONFIG_FILE,
        MODEL_FILE,
        STATE_FILE,
        METRICS_FILE,
        SUMMARY_FILE,
        CURVES_FILE,
        PREDICTIONS_FILE,
        "checkpoint-epoch0004.safetensors",
    ] {
        assert!(dir.join(f).is_file(), "missing {f}");
    }
    // Only the latest checkpoint is kept; no temporary file is left behind.
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("checkpoint-"))
            .count(),
        1
    );
    assert!(!names.iter().any(|n| n.contains(".tmp")), "{names:?}");

    let csv = std::fs::read_to_string(dir.join(METRICS_FILE)).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 5, "{csv}");
    assert!(lines[0].starts_with("epoch,phase,lr,loss,ce,lovasz,val_miou"));
    assert!(lines[0].contains("iou_background"));
    assert!(lines[1].starts_with("1,ce,") && lines[4].starts_with("4,ce+lovasz,"));

    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(STATE_FILE)).unwrap()).unwrap();
    let history: Vec<EpochRecord> = serde_json::from_value(state["history"].clone()).unwrap();
    assert!(
        history[1].ce < history[0].ce,
        "cross-entropy did not decrease: {:?}",
        history.iter().map(|r| r.ce).collect::<Vec<_>>()
    );
    assert!(history[3].lovasz.is_some() && history[0].lovasz.is_none());

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(SUMMARY_FILE)).unwrap()).unwrap();
    assert_eq!(summary["epochs"], 4);
    assert!(summary["test"]["mean_iou"].as_f64().is_some());
    assert_eq!(summary["step_seconds"].as_array().unwrap().len(), 2);
    let png = image::open(dir.join(PREDICTIONS_FILE)).unwrap();
    assert!(
        png.width() >= 3 * 32 && png.height() >= 3 * 32,
        "3 rows of 3 panels"
    );
}

#[test]
fn a_saved_model_predicts_what_the_trained_one_did() {
    let dir = finished_run();
    let (run, model) = load_run(dir, &Device::Cpu, None).unwrap();
    let val = open_split(&DataSpec::Shapes { size: 32, len: 16 }, Split::Val, None).unwrap();
    let samples: Vec<_> = (0..val.len()).map(|i| val.get(i).unwrap()).collect();
    let first = predict_samples(&model, &samples, &run.normalisation, 4).unwrap();

    // Load again into a model with other initial weights: identical predictions.
    let other = UNet::new(&run.model, 99, &Device::Cpu, None).unwrap();
    other.load(&dir.join(MODEL_FILE)).unwrap();
    let second = predict_samples(&other, &samples, &run.normalisation, 3).unwrap();
    assert_eq!(first, second);

    // And the saved run's final validation mIoU is reproduced from the file.
    let cm = confusion(&other, &*val, &run.normalisation, 8).unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(SUMMARY_FILE)).unwrap()).unwrap();
    let saved = summary["val"]["mean_iou"].as_f64().unwrap();
    assert!((cm.mean_iou().unwrap() - saved).abs() < 1e-12);

    // The run was trained on the fused layers; candle's own evaluate it alike.
    let (_, on_candle) = load_run(dir, &Device::Cpu, Some(Layers::Candle)).unwrap();
    assert_eq!(on_candle.layers(), Layers::Candle);
    let cm = confusion(&on_candle, &*val, &run.normalisation, 8).unwrap();
    assert!((cm.mean_iou().unwrap() - saved).abs() < 1e-3);
}

#[test]
fn each_set_of_layers_learns_the_synthetic_shapes() {
    for layers in [Layers::Fused, Layers::Candle] {
        let cfg = TrainConfig {
            epochs: 5,
            ..tiny(Schedule::Ce)
        };
        let options = RunOptions {
            layers: Some(layers),
            ..quiet()
        };
        let mut t = Trainer::new(cfg, &Device::Cpu, None, options).unwrap();
        assert_eq!(t.model().layers(), layers);
        assert!(matches!(t.run().unwrap(), Outcome::Finished(_)));
        let h = t.history();
        let (first, last) = (&h[0], &h[h.len() - 1]);
        assert!(
            last.ce < first.ce,
            "{layers}: CE {} → {}",
            first.ce,
            last.ce
        );
        let (m0, m1) = (first.val_miou.unwrap(), last.val_miou.unwrap());
        assert!(m1 > m0, "{layers}: val mIoU {m0} → {m1}");
    }
}

#[test]
fn a_run_of_the_fused_layers_resumes_on_candles_own() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let cut = RunOptions {
        stop_after_epochs: Some(2),
        ..quiet()
    };
    let mut t = Trainer::new(
        tiny(Schedule::CeThenFinetune),
        &Device::Cpu,
        Some(&dir),
        cut,
    )
    .unwrap();
    assert!(matches!(t.run().unwrap(), Outcome::Stopped { epoch: 2 }));
    let on_candle = RunOptions {
        layers: Some(Layers::Candle),
        ..quiet()
    };
    let mut rest = Trainer::resume(&dir, &Device::Cpu, on_candle).unwrap();
    assert_eq!(rest.model().layers(), Layers::Candle);
    assert!(matches!(rest.run().unwrap(), Outcome::Finished(_)));
    // The whole run on the fused layers, for comparison: the same losses to float
    // rounding (the two sets of layers sum in different orders).
    let mut full =
        Trainer::new(tiny(Schedule::CeThenFinetune), &Device::Cpu, None, quiet()).unwrap();
    assert!(matches!(full.run().unwrap(), Outcome::Finished(_)));
    for (a, b) in full.history().iter().zip(rest.history()) {
        let d = (a.loss - b.loss).abs() / a.loss.abs().max(1e-6);
        assert!(d < 1e-3, "epoch {}: loss {} vs {}", a.epoch, a.loss, b.loss);
    }
}

#[test]
fn resuming_an_interrupted_run_matches_the_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (full_dir, cut_dir) = (tmp.path().join("full"), tmp.path().join("cut"));
    let mut full = Trainer::new(
        tiny(Schedule::CeThenFinetune),
        &Device::Cpu,
        Some(&full_dir),
        quiet(),
    )
    .unwrap();
    let Outcome::Finished(full_summary) = full.run().unwrap() else {
        panic!("the full run did not finish")
    };

    // Killed in the middle of epoch 3 (4 batches per epoch): epochs 1-2 are saved.
    let cut_opts = RunOptions {
        stop_after_steps: Some(10),
        ..quiet()
    };
    let mut cut = Trainer::new(
        tiny(Schedule::CeThenFinetune),
        &Device::Cpu,
        Some(&cut_dir),
        cut_opts,
    )
    .unwrap();
    assert!(matches!(
        cut.run().unwrap(),
        Outcome::Interrupted { epoch: 2 }
    ));
    drop(cut);
    // Then stopped again after one more epoch (the CLI's --stop-after-epochs).
    let once = RunOptions {
        stop_after_epochs: Some(1),
        ..quiet()
    };
    let mut part = Trainer::resume(&cut_dir, &Device::Cpu, once).unwrap();
    assert_eq!(part.epoch(), 2);
    assert!(matches!(part.run().unwrap(), Outcome::Stopped { epoch: 3 }));
    let mut rest = Trainer::resume(&cut_dir, &Device::Cpu, quiet()).unwrap();
    let Outcome::Finished(resumed) = rest.run().unwrap() else {
        panic!("the resumed run did not finish")
    };

    let (a, b) = (full.history(), rest.history());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!(
            (x.loss - y.loss).abs() < 1e-6,
            "epoch {}: {} vs {}",
            x.epoch,
            x.loss,
            y.loss
        );
        assert_eq!(x.val_miou, y.val_miou, "epoch {}", x.epoch);
        assert_eq!(x.lr, y.lr);
    }
    assert_eq!(full_summary.test.mean_iou, resumed.test.mean_iou);
    assert_eq!(full_summary.test.confusion, resumed.test.confusion);
    let csv = std::fs::read_to_string(cut_dir.join(METRICS_FILE)).unwrap();
    assert_eq!(csv.lines().count(), 5);
}

#[test]
fn compare_forks_the_ce_run_and_reports_three_variants() {
    let tmp = tempfile::tempdir().unwrap();
    let base = TrainConfig {
        epochs: 3,
        finetune_epochs: 1,
        ..tiny(Schedule::CeThenFinetune)
    };
    let report =
        unet_example::compare::compare(&base, 1, &Device::Cpu, tmp.path(), &quiet()).unwrap();
    assert_eq!(report.seeds.len(), 1);
    assert_eq!(report.seeds[0].test.len(), 3);
    let md = std::fs::read_to_string(tmp.path().join("compare.md")).unwrap();
    assert!(md.contains("| **mIoU** |") && md.contains("b − a"), "{md}");
    // (b) continues (a): their first two epochs are the same epochs.
    let csv = |v: &str| {
        std::fs::read_to_string(tmp.path().join("seed-3").join(v).join(METRICS_FILE)).unwrap()
    };
    let (a, b) = (csv("ce"), csv("ce-then-finetune"));
    let strip = |line: &str| line.split(',').take(8).collect::<Vec<_>>().join(",");
    for i in 1..=2 {
        assert_eq!(
            strip(a.lines().nth(i).unwrap()),
            strip(b.lines().nth(i).unwrap())
        );
    }
    assert!(b.lines().nth(3).unwrap().starts_with("3,ce+lovasz,"));
    assert!(a.lines().nth(3).unwrap().starts_with("3,ce,"));
}

#[test]
fn group_norm_and_lovasz_only_train_too() {
    let cfg = TrainConfig {
        epochs: 1,
        norm: unet_example::model::Norm::Group { groups: 2 },
        per_image: true,
        ..tiny(Schedule::Lovasz)
    };
    let mut t = Trainer::new(cfg, &Device::Cpu, None, quiet()).unwrap();
    let Outcome::Finished(s) = t.run().unwrap() else {
        panic!("not finished")
    };
    assert!(t.history()[0].lovasz.is_some());
    assert!(s.test.mean_iou.is_some());
}

#[test]
fn val_every_skips_validation_except_at_the_phase_switch_and_the_end() {
    // 5 epochs, fine-tuning the last 2 (switch after epoch 3), validating every 2nd:
    // epochs 2 (every 2nd), 3 (last CE epoch), 4 (every 2nd) and 5 (the last).
    let cfg = TrainConfig {
        epochs: 5,
        finetune_epochs: 2,
        ..tiny(Schedule::CeThenFinetune)
    };
    let options = RunOptions {
        val_every: 2,
        ..quiet()
    };
    let mut t = Trainer::new(cfg, &Device::Cpu, None, options).unwrap();
    let Outcome::Finished(s) = t.run().unwrap() else {
        panic!("not finished")
    };
    let validated: Vec<usize> = t
        .history()
        .iter()
        .filter(|r| r.val_miou.is_some())
        .map(|r| r.epoch)
        .collect();
    assert_eq!(validated, vec![2, 3, 4, 5]);
    let skipped = &t.history()[0];
    assert!(skipped.val_pixel_accuracy.is_none());
    assert!(skipped.val_iou.iter().all(Option::is_none));
    assert_eq!(skipped.val_iou.len(), t.history()[1].val_iou.len());
    assert!(s.best_val_miou.is_some_and(|(_, e)| e >= 2));
}
