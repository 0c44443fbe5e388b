//! The commands: [`run`] carries out a parsed command line (`train`, `compare`, `eval`,
//! `predict`); [`load_run`] reads a trained run back.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle::Device;
use datasets::{Dataset, Split};
use lovasz_candle::distributed::{LocalGroup, ProcessGroup};
use tracing::info;

use super::args::{
    default_output, Backend, Cli, Command, CompareArgs, EvalArgs, PredictArgs, RuntimeArgs,
    TrainArgs,
};
use crate::atomic_file::write_json;
use crate::data::{open_split, DataSpec};
use crate::device::device_name;
use crate::eval::{check_compatible, evaluate, percent, EvalReport};
use crate::model::{Layers, UNet};
use crate::train::checkpoint::MODEL_FILE;
use crate::train::{DataParallel, Outcome, RunConfig, RunOptions, Schedule, TrainConfig, Trainer};
use crate::{compare, visualise, Error, Result};

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => train(args),
        Command::Compare(args) => compare_cmd(args),
        Command::Eval(args) => eval(args),
        Command::Predict(args) => predict(args),
    }
}

fn options(runtime: &RuntimeArgs) -> RunOptions {
    RunOptions {
        progress: !runtime.quiet,
        val_every: runtime.val_every as usize,
        layers: runtime.layers,
        ..Default::default()
    }
}

fn train(args: TrainArgs) -> Result<()> {
    if let Some(world) = mpi_world() {
        if args.ranks > 1 {
            return Err(Error::Usage(format!(
                "--ranks {} in a process started by mpirun (a world of {world}): use one or the other",
                args.ranks
            )));
        }
        return train_mpi(&args, world);
    }
    if args.backend == Backend::Nccl {
        if args.ranks > 1 {
            return Err(Error::Usage(format!(
                "--backend nccl is for processes under mpirun (or a world of one), not --ranks {} threads",
                args.ranks
            )));
        }
        return train_nccl_alone(&args);
    }
    let device = args.runtime.device.open()?;
    if args.ranks > 1 {
        return train_ranks(&args, &device);
    }
    if args.sync_bn {
        return Err(Error::Usage(
            "--sync-bn synchronises batch norm over the ranks of a data-parallel job: add --ranks N, or launch with mpirun".into(),
        ));
    }
    let mut trainer = trainer(&args, &device, true)?;
    let dir = trainer.output().map(Path::to_path_buf).unwrap_or_default();
    report(trainer.run()?, &dir);
    Ok(())
}

/// Prints how a run ended: the test table and step times, or how to continue it.
fn report(outcome: Outcome, dir: &Path) {
    match outcome {
        Outcome::Finished(summary) => {
            println!("{}", summary.test.table());
            for st in &summary.step_seconds {
                println!(
                    "{:>10}: {:.3} s/step over {} steps",
                    st.phase.name(),
                    st.seconds,
                    st.steps
                );
            }
            println!(
                "test mIoU {}% after {} epochs ({:.0} s); files in {}",
                percent(summary.test.mean_iou),
                summary.epochs,
                summary.train_seconds,
                dir.display()
            );
        }
        Outcome::Stopped { epoch } | Outcome::Interrupted { epoch } => {
            println!(
                "stopped after epoch {epoch}; continue with: unet-example train --resume {}",
                dir.display()
            );
        }
    }
}

/// The trainer of `args` on `device`: a new run (writing its folder when `lead`) or the
/// resumed one.
fn trainer(args: &TrainArgs, device: &Device, lead: bool) -> Result<Trainer> {
    let mut options = options(&args.runtime);
    options.stop_after_epochs = args.stop_after_epochs;
    options.overwrite = args.overwrite;
    if let Some(dir) = &args.resume {
        return Trainer::resume(dir, device, options);
    }
    let cfg = new_config(args);
    let out = args.output.clone().unwrap_or_else(|| default_output(&cfg));
    let t = Trainer::new(cfg, device, lead.then_some(out.as_path()), options)?;
    if lead {
        info!(
            "training a {}-parameter U-Net on {} ({}, {} layers), writing to {}",
            t.model().num_parameters(),
            t.config().train.dataset,
            device_name(device),
            t.model().layers(),
            out.display()
        );
    }
    Ok(t)
}

/// The training configuration of a new run.
fn new_config(args: &TrainArgs) -> TrainConfig {
    TrainConfig {
        sync_bn: args.sync_bn,
        ..args.training.config(args.schedule)
    }
}

/// The start of a data-parallel job: the ranks agree on how they were started (the
/// configuration of a new run, or the run to resume, and the options that change what
/// each rank does), and on a global batch they divide. Otherwise every rank fails with the
/// same message, before anything is written.
fn agree_on_start(args: &TrainArgs, parallel: &DataParallel) -> Result<()> {
    let cfg = args.resume.is_none().then(|| new_config(args));
    parallel.agree(&serde_json::json!({
        "train": cfg,
        "resume": args.resume,
        "stop_after_epochs": args.stop_after_epochs,
        "layers": args.runtime.layers.map(|l| l.to_string()),
    }))?;
    if let Some(cfg) = &cfg {
        cfg.validate()?;
        parallel.check_batch(cfg.batch_size)?;
    }
    Ok(())
}

/// This rank's trainer in a data-parallel job, once the ranks agree on the start.
fn rank_trainer(args: &TrainArgs, device: &Device, parallel: DataParallel) -> Result<Trainer> {
    trainer(args, device, parallel.is_lead())?.data_parallel(parallel)
}

/// `train --ranks N`: one thread per rank, rank 0's outcome reported.
fn train_ranks(args: &TrainArgs, device: &Device) -> Result<()> {
    let groups = LocalGroup::new(args.ranks as usize)?;
    info!(
        "training data-parallel on {} ranks in this process",
        args.ranks
    );
    let outcomes: Vec<Result<(Outcome, PathBuf)>> = std::thread::scope(|s| {
        let threads: Vec<_> = groups
            .into_iter()
            .map(|g| {
                s.spawn(move || -> Result<(Outcome, PathBuf)> {
                    let parallel = DataParallel::new(Arc::new(g));
                    agree_on_start(args, &parallel)?;
                    let mut t = rank_trainer(args, device, parallel)?;
                    let dir = t.output().map(Path::to_path_buf).unwrap_or_default();
                    Ok((t.run()?, dir))
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(Error::Usage("a rank's thread panicked".into())))
            })
            .collect()
    });
    let mut outcomes = outcomes.into_iter();
    let (outcome, dir) = match outcomes.next() {
        Some(first) => first?,
        None => return Err(Error::Usage("no rank ran".into())),
    };
    for other in outcomes {
        other?;
    }
    report(outcome, &dir);
    Ok(())
}

/// The world size when this process was started by `mpirun` (OpenMPI's variables, or
/// the PMI ones of MPICH and Slurm).
fn mpi_world() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// `mpirun -np N unet-example train`: this process is one rank over MPI; with `--device
/// cuda`, rank `r` of a node takes GPU `r` (its local rank). Rank 0 writes and reports.
#[cfg(feature = "mpi")]
fn train_mpi(args: &TrainArgs, world: usize) -> Result<()> {
    use crate::device::DeviceChoice;
    use lovasz_candle::distributed::MpiGroup;

    let group = Arc::new(MpiGroup::init()?);
    if group.world_size() != world {
        return Err(Error::Usage(format!(
            "mpirun announced {world} ranks but MPI has {}",
            group.world_size()
        )));
    }
    let local: usize = std::env::var("OMPI_COMM_WORLD_LOCAL_RANK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let choice = match args.runtime.device {
        DeviceChoice::Cuda(0) => DeviceChoice::Cuda(local),
        other => other,
    };
    let (rank, lead) = (group.rank(), group.rank() == 0);
    // An error here is every rank's: each returns it, and MPI is finalised.
    agree_on_start(args, &DataParallel::new(group.clone()))?;
    let t = choice.open().and_then(|device| {
        let parallel = match args.backend {
            Backend::Mpi => DataParallel::new(group.clone()),
            Backend::Nccl => DataParallel::new(nccl_over_mpi(&group, &device)?),
        };
        rank_trainer(args, &device, parallel)
    });
    let mut t = t.unwrap_or_else(|e| fail_alone(&group, rank, e));
    if lead {
        let backend = match args.backend {
            Backend::Mpi => "MPI",
            Backend::Nccl => "NCCL",
        };
        info!("training data-parallel on {world} ranks ({backend} collectives)");
    }
    let dir = t.output().map(Path::to_path_buf).unwrap_or_default();
    // This process is one rank: on the CPU, its epochs on a worker of the pool its
    // layers use, as a one-process run (its collectives block no other worker's work).
    let device = t.model().device().clone();
    match crate::device::on_compute_pool(&device, || t.run()) {
        Ok(outcome) if lead => report(outcome, &dir),
        Ok(_) => {}
        Err(e) => fail_alone(&group, rank, e),
    }
    Ok(())
}

/// `device` as the CUDA device an NCCL rank needs.
#[cfg(feature = "nccl")]
fn nccl_device(device: &Device) -> Result<&candle::CudaDevice> {
    device.as_cuda_device().map_err(|_| {
        Error::Usage(format!(
            "--backend nccl runs on CUDA devices, and the device is {}: add --device cuda",
            device_name(device)
        ))
    })
}

/// The error of `--backend nccl` in a build without NCCL.
#[cfg(not(feature = "nccl"))]
fn without_nccl() -> Error {
    Error::Usage("--backend nccl: built without NCCL: rebuild with `--features nccl`".into())
}

/// A world of one rank over NCCL on `device`.
fn nccl_alone(device: &Device) -> Result<Arc<dyn ProcessGroup>> {
    #[cfg(feature = "nccl")]
    return Ok(Arc::new(lovasz_candle::distributed::NcclGroup::single(
        nccl_device(device)?,
    )?));
    #[cfg(not(feature = "nccl"))]
    {
        let _ = device;
        Err(without_nccl())
    }
}

/// The ranks of `mpi` over NCCL, this rank on `device`.
#[cfg(feature = "mpi")]
fn nccl_over_mpi(
    mpi: &lovasz_candle::distributed::MpiGroup,
    device: &Device,
) -> Result<Arc<dyn ProcessGroup>> {
    #[cfg(feature = "nccl")]
    return Ok(Arc::new(lovasz_candle::distributed::NcclGroup::from_mpi(
        mpi,
        nccl_device(device)?,
    )?));
    #[cfg(not(feature = "nccl"))]
    {
        let _ = (mpi, device);
        Err(without_nccl())
    }
}

/// `train --backend nccl` without mpirun: a data-parallel job of one rank over NCCL (what
/// a GPU machine without an MPI launcher can run).
fn train_nccl_alone(args: &TrainArgs) -> Result<()> {
    let device = args.runtime.device.open()?;
    let parallel = DataParallel::new(nccl_alone(&device)?);
    agree_on_start(args, &parallel)?;
    info!("training data-parallel on 1 rank (NCCL collectives)");
    let mut t = rank_trainer(args, &device, parallel)?;
    let dir = t.output().map(Path::to_path_buf).unwrap_or_default();
    report(t.run()?, &dir);
    Ok(())
}

/// An error of this rank alone (the others are, or soon will be, waiting for it in a
/// collective): printed, then the whole job ended with `MPI_Abort`.
#[cfg(feature = "mpi")]
fn fail_alone(group: &lovasz_candle::distributed::MpiGroup, rank: usize, e: Error) -> ! {
    eprintln!("Error on rank {rank}: {e}; ending the job");
    group.abort(1)
}

#[cfg(not(feature = "mpi"))]
fn train_mpi(_: &TrainArgs, world: usize) -> Result<()> {
    Err(Error::Usage(format!(
        "started by mpirun (a world of {world}) but built without MPI: rebuild with `--features mpi`"
    )))
}

fn compare_cmd(args: CompareArgs) -> Result<()> {
    let device = args.runtime.device.open()?;
    let mut options = options(&args.runtime);
    options.overwrite = args.overwrite;
    let base = args.training.config(Schedule::CeThenFinetune);
    base.validate()?;
    let report = compare::compare(&base, args.seeds, &device, &args.output, &options)?;
    info!(
        "compare done in {:.0} s: {}",
        report.wall_seconds,
        args.output.join("compare.md").display()
    );
    Ok(())
}

/// Reads a run folder's configuration and weights onto `device`, into a model on
/// `layers` (`None`: the device's default).
pub fn load_run(
    dir: &Path,
    device: &candle::Device,
    layers: Option<Layers>,
) -> Result<(RunConfig, UNet)> {
    let run = RunConfig::read(dir)?;
    let model = UNet::new(&run.model, 0, device, layers)?;
    model.load(&dir.join(MODEL_FILE))?;
    Ok((run, model))
}

fn dataset_for(
    run: &RunConfig,
    dataset: &Option<String>,
    num_classes: Option<usize>,
    split: Split,
) -> Result<std::sync::Arc<dyn Dataset>> {
    let (spec, k) = match dataset {
        Some(s) => (
            s.parse::<DataSpec>()?,
            num_classes.or(Some(run.model.num_classes)),
        ),
        None => (
            run.train.dataset.parse::<DataSpec>()?,
            run.train.num_classes,
        ),
    };
    let k = match spec {
        // Shapes take any class count: generate the model's.
        DataSpec::Shapes { .. } => k.or(Some(run.model.num_classes)),
        _ => k,
    };
    open_split(&spec, split, k)
}

fn eval(args: EvalArgs) -> Result<()> {
    let device = args.runtime.device.open()?;
    let (run, model) = load_run(&args.checkpoint, &device, args.runtime.layers)?;
    let ds = dataset_for(&run, &args.dataset, args.num_classes, args.split)?;
    check_compatible(&model, &*ds)?;
    let metrics = evaluate(&model, &*ds, &run.normalisation, args.batch_size)?;
    let report = EvalReport::of(&metrics, &run.data.class_names, args.split.name(), ds.len())?;
    let out = args
        .output
        .clone()
        .unwrap_or_else(|| args.checkpoint.join(format!("eval-{}.json", args.split)));
    write_json(&out, &report)?;
    if args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| Error::json(&out, e))?;
        println!("{text}");
    } else {
        println!("{}", report.table());
        println!("confusion matrix (rows: ground truth, columns: prediction)");
        println!("{}", report.confusion_table());
        println!("JSON report: {}", out.display());
    }
    Ok(())
}

fn predict(args: PredictArgs) -> Result<()> {
    let device = args.runtime.device.open()?;
    let (run, model) = load_run(&args.checkpoint, &device, args.runtime.layers)?;
    if let Some(input) = &args.input {
        let sample = visualise::read_image(input, run.model.in_channels)?;
        let out = args
            .output
            .clone()
            .unwrap_or_else(|| input.with_extension("mask.png"));
        let pred = visualise::write_mask(
            &model,
            &sample,
            &run.normalisation,
            &run.data.palette,
            args.index,
            &out,
        )?;
        let mut counts = vec![0usize; run.model.num_classes];
        for &c in &pred {
            if let Some(n) = counts.get_mut(c as usize) {
                *n += 1;
            }
        }
        println!(
            "wrote {} ({}x{})",
            out.display(),
            sample.width,
            sample.height
        );
        for (name, n) in run.data.class_names.iter().zip(counts) {
            if n > 0 {
                println!(
                    "{name:>16}: {:5.1}%",
                    100.0 * n as f64 / pred.len().max(1) as f64
                );
            }
        }
        return Ok(());
    }
    let ds = dataset_for(&run, &args.dataset, args.num_classes, args.split)?;
    check_compatible(&model, &*ds)?;
    let out = args.output.clone().unwrap_or_else(|| {
        args.checkpoint
            .join(format!("predictions-{}.png", args.split))
    });
    let indices = visualise::spread(ds.len(), args.count);
    visualise::prediction_grid(&model, &*ds, &indices, &run.normalisation, &run.data, &out)?;
    println!(
        "wrote {} (rows: {} {} images; columns: image | ground truth | prediction)",
        out.display(),
        indices.len(),
        args.split
    );
    Ok(())
}
