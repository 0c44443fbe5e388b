//! Conformance to the reference: every case of `fixtures/lovasz_reference.json`, computed
//! with the authors' PyTorch code (float64 on float32 inputs), checked in f32 and in f64,
//! on the CPU path, on the host-copy path that Metal takes, through the host emulation of
//! the CUDA path and (with the `cuda` feature, on a GPU) on CUDA; and the Lovász-Softmax
//! cases again with their inputs in channels-last layout.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle::{DType, Device, Tensor, Var};
use lovasz_candle::metrics::{iou, iou_binary, IouConfig};
use lovasz_candle::{
    binary_xloss, force_device_emulation, force_host_copy, lovasz_grad, lovasz_hinge,
    lovasz_sigmoid, lovasz_softmax, Classes, LovaszHingeConfig, LovaszSigmoidConfig,
    LovaszSoftmaxConfig,
};
use serde_json::Value;

const ATOL: f64 = 2e-6;
const RTOL: f64 = 2e-5;

struct Fixtures {
    cases: Vec<Value>,
    tensors: HashMap<String, Tensor>,
}

/// The fixtures, with their tensors on `device`. Read from `tests/fixtures`, or from
/// `LOVASZ_FIXTURES` (where the test binary runs away from its source tree).
fn fixtures(device: &Device) -> Result<Fixtures> {
    let dir = match std::env::var_os("LOVASZ_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
    };
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("lovasz_reference.json"))?)?;
    let tensors = candle::safetensors::load(dir.join("lovasz_reference.safetensors"), device)?;
    let cases = json["cases"].as_array().context("cases")?.clone();
    Ok(Fixtures { cases, tensors })
}

impl Fixtures {
    fn get(&self, case: &Value, section: &str, key: &str) -> Result<Tensor> {
        let name = case[section][key]
            .as_str()
            .with_context(|| format!("{section}.{key}"))?;
        self.tensors
            .get(name)
            .cloned()
            .with_context(|| format!("tensor {name}"))
    }
}

fn ignore(params: &Value) -> Option<u32> {
    params["ignore"].as_u64().map(|v| v as u32)
}

fn assert_close(name: &str, what: &str, got: &[f64], want: &[f64]) -> Result<()> {
    if got.len() != want.len() {
        bail!(
            "{name}: {what} has {} values, expected {}",
            got.len(),
            want.len()
        )
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let within = (g - w).abs() <= ATOL + RTOL * w.abs();
        if !within {
            bail!("{name}: {what}[{i}] = {g}, expected {w}")
        }
    }
    Ok(())
}

fn flat(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?)
}

/// Runs a differentiable loss on `input` (as a variable of `dtype`) and returns the loss
/// and its gradient.
fn loss_and_grad(
    input: &Tensor,
    dtype: DType,
    f: impl Fn(&Tensor) -> candle::Result<Tensor>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let var = Var::from_tensor(&input.to_dtype(dtype)?)?;
    let loss = f(var.as_tensor())?;
    if loss.dtype() != dtype {
        bail!("loss dtype {:?}, expected {dtype:?}", loss.dtype())
    }
    let grads = loss.backward()?;
    let grad = match grads.get(&var) {
        Some(g) => flat(g)?,
        None => vec![0.0; input.elem_count()],
    };
    Ok((flat(&loss)?, grad))
}

fn softmax_config(params: &Value) -> Result<LovaszSoftmaxConfig> {
    let classes = match &params["classes"] {
        Value::String(s) if s == "present" => Classes::Present,
        Value::String(s) if s == "all" => Classes::All,
        Value::Array(list) => Classes::List(
            list.iter()
                .map(|v| v.as_u64().unwrap_or(0) as usize)
                .collect(),
        ),
        other => bail!("unknown classes {other}"),
    };
    Ok(LovaszSoftmaxConfig {
        classes,
        per_image: params["per_image"].as_bool().context("per_image")?,
        ignore_index: ignore(params),
        ..Default::default()
    })
}

fn check_case(fx: &Fixtures, case: &Value, dtype: DType) -> Result<()> {
    let name = case["name"].as_str().context("name")?;
    let params = &case["params"];
    let function = case["function"].as_str().context("function")?;
    match function {
        "lovasz_hinge" | "lovasz_sigmoid" | "lovasz_softmax" | "binary_xloss" => {
            let (input_key, grad_key) = match function {
                "lovasz_hinge" | "binary_xloss" => ("logits", "grad_logits"),
                _ => ("probas", "grad_probas"),
            };
            let input = fx.get(case, "inputs", input_key)?;
            let labels = fx.get(case, "inputs", "labels")?;
            let per_image = params["per_image"].as_bool().unwrap_or(false);
            let ign = ignore(params);
            let (loss, grad) = match function {
                "lovasz_hinge" => loss_and_grad(&input, dtype, |x| {
                    lovasz_hinge(
                        x,
                        &labels,
                        &LovaszHingeConfig {
                            per_image,
                            ignore_index: ign,
                            ..Default::default()
                        },
                    )
                })?,
                "lovasz_sigmoid" => loss_and_grad(&input, dtype, |x| {
                    lovasz_sigmoid(
                        x,
                        &labels,
                        &LovaszSigmoidConfig {
                            per_image,
                            ignore_index: ign,
                            ..Default::default()
                        },
                    )
                })?,
                "binary_xloss" => loss_and_grad(&input, dtype, |x| binary_xloss(x, &labels, ign))?,
                _ => {
                    let cfg = softmax_config(params)?;
                    loss_and_grad(&input, dtype, |x| lovasz_softmax(x, &labels, &cfg))?
                }
            };
            assert_close(
                name,
                "loss",
                &loss,
                &flat(&fx.get(case, "expected", "loss")?)?,
            )?;
            assert_close(
                name,
                "gradient",
                &grad,
                &flat(&fx.get(case, "expected", grad_key)?)?,
            )?;
        }
        "lovasz_grad" => {
            let gt = fx.get(case, "inputs", "gt_sorted")?;
            let gt = if dtype == DType::F64 {
                gt.to_dtype(DType::F64)?
            } else {
                gt
            };
            let got = flat(&lovasz_grad(&gt)?)?;
            assert_close(
                name,
                "grad",
                &got,
                &flat(&fx.get(case, "expected", "grad")?)?,
            )?;
        }
        "iou_binary" | "iou" => {
            let preds = fx.get(case, "inputs", "preds")?;
            let labels = fx.get(case, "inputs", "labels")?;
            let cfg = IouConfig {
                empty: params["empty"].as_f64().context("empty")?,
                ignore_index: ignore(params),
                per_image: params["per_image"].as_bool().context("per_image")?,
            };
            let got = if function == "iou" {
                let n = params["n_classes"].as_u64().context("n_classes")? as usize;
                iou(&preds, &labels, n, &cfg)?
            } else {
                vec![iou_binary(&preds, &labels, &cfg)?]
            };
            let percent: Vec<f64> = got.iter().map(|v| v * 100.0).collect();
            let want = flat(&fx.get(case, "expected", "iou_percent")?)?;
            // Percent values: the same relative tolerance, on the reference's scale.
            assert_close(name, "iou_percent", &percent, &want)?;
        }
        other => bail!("{name}: unknown function {other}"),
    }
    Ok(())
}

/// The path a loss takes on the CPU.
#[derive(Clone, Copy)]
enum Path {
    /// The fused CPU op.
    Cpu,
    /// The path of devices without a kernel of their own: the input copied to the host.
    HostCopy,
    /// The GPU path's composition, emulated on the host.
    Emulated,
    /// Every tensor on the first CUDA device (needs a GPU).
    #[cfg(feature = "cuda")]
    Cuda,
}

impl Path {
    fn device(self) -> Result<Device> {
        Ok(match self {
            #[cfg(feature = "cuda")]
            Path::Cuda => Device::new_cuda(0)?,
            _ => Device::Cpu,
        })
    }
}

/// Runs `check` on every case that `select` picks (there must be `expected` of them),
/// on `path`; fails with every failing case.
fn check_cases(
    what: &str,
    path: Path,
    expected: usize,
    select: impl Fn(&Value) -> bool,
    check: impl Fn(&Fixtures, &Value) -> Result<()>,
) -> Result<()> {
    let fx = fixtures(&path.device()?)?;
    force_host_copy(matches!(path, Path::HostCopy));
    force_device_emulation(matches!(path, Path::Emulated));
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in fx.cases.iter().filter(|c| select(c)) {
        checked += 1;
        if let Err(e) = check(&fx, case) {
            failures.push(format!("{e:#}"));
        }
    }
    force_host_copy(false);
    force_device_emulation(false);
    assert_eq!(checked, expected, "fixture count changed");
    if !failures.is_empty() {
        bail!(
            "{} of {checked} {what} fail:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

fn check_all(dtype: DType, path: Path) -> Result<()> {
    let what = format!("cases ({dtype:?})");
    check_cases(
        &what,
        path,
        83,
        |_| true,
        |fx, case| check_case(fx, case, dtype),
    )
}

/// `t` (`[B, C, *spatial]`) with its class axis moved last: `[B, *spatial, C]`, contiguous.
fn channels_last(t: &Tensor) -> Result<Tensor> {
    let mut order: Vec<usize> = (0..t.rank()).filter(|&d| d != 1).collect();
    order.push(1);
    Ok(t.permute(order)?.contiguous()?)
}

/// Every Lovász-Softmax case with its probabilities given channels last
/// (`channels_last: true`): the reference's loss, and its gradient in that layout.
fn check_softmax_channels_last(dtype: DType, path: Path) -> Result<()> {
    let softmax = |case: &Value| case["function"].as_str() == Some("lovasz_softmax");
    let what = format!("channels-last cases ({dtype:?})");
    check_cases(&what, path, 35, softmax, |fx, case| {
        let name = case["name"].as_str().context("name")?;
        let probas = channels_last(&fx.get(case, "inputs", "probas")?)?;
        let labels = fx.get(case, "inputs", "labels")?;
        let cfg = LovaszSoftmaxConfig {
            channels_last: true,
            ..softmax_config(&case["params"])?
        };
        let (loss, grad) = loss_and_grad(&probas, dtype, |x| lovasz_softmax(x, &labels, &cfg))?;
        let want_loss = flat(&fx.get(case, "expected", "loss")?)?;
        let want_grad = channels_last(&fx.get(case, "expected", "grad_probas")?)?;
        assert_close(name, "loss", &loss, &want_loss)?;
        assert_close(name, "gradient (channels last)", &grad, &flat(&want_grad)?)
    })
}

#[test]
fn reference_softmax_channels_last_f32() -> Result<()> {
    check_softmax_channels_last(DType::F32, Path::Cpu)
}

#[test]
fn reference_softmax_channels_last_f64() -> Result<()> {
    check_softmax_channels_last(DType::F64, Path::Cpu)
}

#[test]
fn reference_softmax_channels_last_host_copy_path() -> Result<()> {
    check_softmax_channels_last(DType::F32, Path::HostCopy)
}

#[test]
fn reference_cases_f32() -> Result<()> {
    check_all(DType::F32, Path::Cpu)
}

#[test]
fn reference_cases_f64() -> Result<()> {
    check_all(DType::F64, Path::Cpu)
}

#[test]
fn reference_cases_host_copy_path() -> Result<()> {
    check_all(DType::F32, Path::HostCopy)
}

#[test]
fn reference_cases_device_emulation_f32() -> Result<()> {
    check_all(DType::F32, Path::Emulated)
}

#[test]
fn reference_cases_device_emulation_f64() -> Result<()> {
    check_all(DType::F64, Path::Emulated)
}

#[test]
fn reference_softmax_channels_last_device_emulation() -> Result<()> {
    check_softmax_channels_last(DType::F32, Path::Emulated)
}

#[cfg(feature = "cuda")]
#[test]
fn reference_cases_cuda_f32() -> Result<()> {
    check_all(DType::F32, Path::Cuda)
}

#[cfg(feature = "cuda")]
#[test]
fn reference_cases_cuda_f64() -> Result<()> {
    check_all(DType::F64, Path::Cuda)
}

#[cfg(feature = "cuda")]
#[test]
fn reference_softmax_channels_last_cuda() -> Result<()> {
    check_softmax_channels_last(DType::F32, Path::Cuda)
}
