//! The binary on bad input: a clear `error: ...` line and a failure exit code, never a
//! panic. Plus one tiny end-to-end `train` → `eval` → `predict` through the CLI.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;

fn unet(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_unet-example"))
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the binary runs")
}

/// Asserts failure with `needle` in stderr and no panic.
fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded; stderr: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

/// Asserts success (with stderr in the message) and returns stdout.
fn succeeds(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const TINY: &[&str] = &[
    "--dataset",
    "shapes:32:8",
    "--epochs",
    "2",
    "--finetune-epochs",
    "1",
    "--depth",
    "2",
    "--base-width",
    "4",
    "--quiet",
];

/// A run trained through the CLI, shared by the tests.
fn cli_run() -> &'static Path {
    static RUN: OnceLock<tempfile::TempDir> = OnceLock::new();
    RUN.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let mut args = vec!["train", "-o", "run"];
        args.extend_from_slice(TINY);
        let stdout = succeeds(&unet(&args, tmp.path()));
        assert!(stdout.contains("test mIoU"), "{stdout}");
        tmp
    })
    .path()
}

#[test]
fn eval_and_predict_a_cli_run() {
    let root = cli_run();
    let stdout = succeeds(&unet(
        &["eval", "--checkpoint", "run", "--split", "val"],
        root,
    ));
    assert!(
        stdout.contains("mIoU") && stdout.contains("confusion matrix"),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("run/eval-val.json")).unwrap())
            .unwrap();
    assert_eq!(json["classes"].as_array().unwrap().len(), 6);

    let out = unet(&["eval", "--checkpoint", "run", "--json"], root);
    let text = String::from_utf8_lossy(&out.stdout);
    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(parsed["split"], "test");

    let out = unet(&["predict", "--checkpoint", "run", "--count", "2"], root);
    succeeds(&out);
    assert!(root.join("run/predictions-val.png").is_file());

    image::RgbImage::from_pixel(20, 12, image::Rgb([200, 40, 40]))
        .save(root.join("photo.png"))
        .unwrap();
    let out = unet(
        &[
            "predict",
            "--checkpoint",
            "run",
            "--input",
            "photo.png",
            "-o",
            "mask.png",
        ],
        root,
    );
    succeeds(&out);
    let mask = image::open(root.join("mask.png")).unwrap();
    assert_eq!((mask.width(), mask.height()), (20, 12));
    let out = unet(
        &[
            "predict",
            "--checkpoint",
            "run",
            "--input",
            "photo.png",
            "-o",
            "idx.png",
            "--index",
        ],
        root,
    );
    succeeds(&out);
    let idx = image::open(root.join("idx.png")).unwrap().to_luma8();
    assert!(idx.pixels().all(|p| p.0[0] < 6));
}

#[test]
fn bad_data_sets_and_paths() {
    let tmp = tempfile::tempdir().unwrap();
    fails_with(
        &unet(&["train", "--dataset", "mnist"], tmp.path()),
        "unknown data set \"mnist\"",
    );
    fails_with(
        &unet(
            &[
                "train",
                "--dataset",
                "folder:/no/such/folder",
                "--num-classes",
                "3",
            ],
            tmp.path(),
        ),
        "/no/such/folder",
    );
    fails_with(
        &unet(
            &["train", "--dataset", "folder:/no/such/folder"],
            tmp.path(),
        ),
        "--num-classes",
    );
    fails_with(
        &unet(&["train", "--dataset", "voc:/no/voc"], tmp.path()),
        "/no/voc",
    );
    fails_with(
        &unet(
            &["train", "--dataset", "brain", "--num-classes", "4"],
            tmp.path(),
        ),
        "class count mismatch",
    );
    fails_with(
        &unet(&["train", "--crop", "30x30"], tmp.path()),
        "multiples of 8",
    );
    fails_with(&unet(&["train", "--epochs", "0"], tmp.path()), "--epochs");
    // A crop larger than every image (32x32 here) would be all padding.
    fails_with(
        &unet(
            &["train", "--dataset", "shapes:32:6", "--crop", "1000x1000"],
            tmp.path(),
        ),
        "larger than every training image (at most 32x32)",
    );
}

#[test]
fn unavailable_device_names_the_feature() {
    let tmp = tempfile::tempdir().unwrap();
    if cfg!(not(feature = "cuda")) {
        fails_with(
            &unet(&["train", "--device", "cuda"], tmp.path()),
            "--features cuda",
        );
    }
    if cfg!(not(feature = "metal")) {
        fails_with(
            &unet(&["train", "--device", "metal"], tmp.path()),
            "--features metal",
        );
    }
    fails_with(
        &unet(&["train", "--device", "tpu"], tmp.path()),
        "unknown device",
    );
}

#[test]
fn bad_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    fails_with(
        &unet(&["eval", "--checkpoint", "nowhere"], tmp.path()),
        "not a training run folder",
    );
    fails_with(
        &unet(&["train", "--resume", "nowhere"], tmp.path()),
        "not a training run folder",
    );

    // A config.json that describes another network than the weights.
    let root = cli_run();
    let copy = tmp.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(root.join("run").join(f), copy.join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(copy.join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    json["model"]["base_width"] = 8.into();
    std::fs::write(copy.join("config.json"), json.to_string()).unwrap();
    fails_with(
        &unet(&["eval", "--checkpoint", "copy"], tmp.path()),
        "does not match the model configuration",
    );
    json["model"]["base_width"] = 4.into();
    json["model"]["depth"] = 3.into();
    std::fs::write(copy.join("config.json"), json.to_string()).unwrap();
    fails_with(
        &unet(&["predict", "--checkpoint", "copy"], tmp.path()),
        "is missing",
    );

    // Weights that are not safetensors at all.
    std::fs::write(copy.join("model.safetensors"), b"not a tensor file").unwrap();
    fails_with(
        &unet(&["eval", "--checkpoint", "copy"], tmp.path()),
        "does not match the model configuration",
    );

    // A data set with another class count than the model.
    fails_with(
        &unet(
            &[
                "eval",
                "--checkpoint",
                "run",
                "--dataset",
                "shapes:32:8",
                "--num-classes",
                "3",
            ],
            root,
        ),
        "class count mismatch",
    );
    // A data set the model was not trained for.
    fails_with(
        &unet(
            &[
                "eval",
                "--checkpoint",
                "run",
                "--dataset",
                "brain",
                "--num-classes",
                "15",
            ],
            root,
        ),
        "mismatch",
    );
}

#[test]
fn an_existing_run_is_not_overwritten_by_accident() {
    let root = cli_run();
    let mut args = vec!["train", "-o", "run"];
    args.extend_from_slice(TINY);
    fails_with(&unet(&args, root), "already holds a run");
    // --resume on a finished run just re-evaluates and rewrites the summary.
    let out = unet(&["train", "--resume", "run", "--quiet"], root);
    succeeds(&out);
    // --resume does not take training options.
    let out = unet(&["train", "--resume", "run", "--epochs", "9"], root);
    assert!(!out.status.success());
}

#[test]
fn a_killed_run_resumes_to_the_same_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let args = |out: &'static str| {
        let mut a = vec!["train", "-o", out];
        a.extend_from_slice(&[
            "--dataset",
            "shapes:32:48",
            "--epochs",
            "6",
            "--finetune-epochs",
            "2",
            "--depth",
            "2",
            "--base-width",
            "4",
            "--quiet",
        ]);
        a
    };
    let full = unet(&args("full"), tmp.path());
    succeeds(&full);

    // Kill (SIGKILL) as soon as the first epoch is saved: mid-epoch or mid-save.
    let mut child = Command::new(env!("CARGO_BIN_EXE_unet-example"))
        .args(args("killed"))
        .current_dir(tmp.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let state = tmp.path().join("killed/train_state.json");
    let start = std::time::Instant::now();
    while !state.exists() && start.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run finished before it could be killed"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert!(saved["epoch"].as_u64().unwrap() < 6);
    let out = unet(&["train", "--resume", "killed", "--quiet"], tmp.path());
    succeeds(&out);

    // metrics.csv without the timing columns (9 and 10).
    let metrics = |run: &str| -> Vec<String> {
        std::fs::read_to_string(tmp.path().join(run).join("metrics.csv"))
            .unwrap()
            .lines()
            .map(|l| {
                let cols: Vec<&str> = l.split(',').collect();
                [&cols[..8], &cols[10..]].concat().join(",")
            })
            .collect()
    };
    assert_eq!(metrics("full"), metrics("killed"));
    let test_miou = |run: &str| -> serde_json::Value {
        let s = std::fs::read_to_string(tmp.path().join(run).join("summary.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&s).unwrap()["test"]["mean_iou"].clone()
    };
    assert_eq!(test_miou("full"), test_miou("killed"));
}

#[test]
fn data_parallel_options_that_cannot_work() {
    let tmp = tempfile::tempdir().unwrap();
    let small = ["train", "--dataset", "shapes:32:6", "--epochs", "1"];
    let with = |extra: &[&str]| {
        let args: Vec<&str> = small.iter().chain(extra).copied().collect();
        unet(&args, tmp.path())
    };
    fails_with(
        &with(&["--sync-bn"]),
        "add --ranks N, or launch with mpirun",
    );
    fails_with(
        &with(&["--sync-bn", "--ranks", "2", "--norm", "group"]),
        "--sync-bn synchronises batch-norm statistics",
    );
    fails_with(
        &with(&["--backend", "nccl", "--ranks", "2"]),
        "not --ranks 2 threads",
    );
    if cfg!(feature = "nccl") {
        fails_with(
            &with(&["--backend", "nccl", "--device", "cpu"]),
            "runs on CUDA devices",
        );
    } else {
        fails_with(&with(&["--backend", "nccl"]), "--features nccl");
    }
    // As mpirun starts it.
    let out = Command::new(env!("CARGO_BIN_EXE_unet-example"))
        .args(small)
        .current_dir(tmp.path())
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    if cfg!(not(feature = "mpi")) {
        fails_with(&out, "built without MPI");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_unet-example"))
        .args(small)
        .args(["--ranks", "2"])
        .current_dir(tmp.path())
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    fails_with(&out, "use one or the other");
    assert!(
        std::fs::read_dir(tmp.path()).unwrap().next().is_none(),
        "a failed start wrote nothing"
    );
}
