#!/usr/bin/env bash
# The CUDA check of lovasz-candle and the U-Net example, in two halves.
#
#   bash scripts/gpu-check.sh build        # here, without a GPU: builds the CUDA test
#                                          # binaries, the GPU bench and a release
#                                          # unet-example (cudnn,nccl), packed into gpu-check/
#   bash scripts/gpu-check.sh run [PARTS]  # on the GPU machine, from the repository root
#
# PARTS (default: all) is a comma-separated choice of `loss` (the CUDA tests, the NCCL
# group's, the fixtures and the loss bench) and `unet` (the default `train --device
# cuda`, a small run with `--backend nccl` against the same without, then the step times
# against the PyTorch twin at the default configuration and at base width 32, batch 32,
# with the peak device memory of each).
#
# `build` needs the toolkit of .ci/cuda-toolkit.sh (installed from PyPI on first use) and
# the authors' lovasz_losses.py (REFERENCE=path, default ../shared/reference/), copied
# into gpu-check/reference/ (an ignored folder: the file is not part of this project).
# `run` needs the driver, python3 with torch (PYTHON, default /opt/torch/.venv/bin/python3)
# and the NVIDIA wheels under its site-packages (cuBLAS, cuRAND, NVRTC, the runtime, NCCL),
# which the binaries load from there. It runs the CUDA tests (every loss, value and
# gradient, against the CPU op), the reference fixtures on CUDA in f32 and f64, then forward + backward of the Lovász-Softmax at
# 10x20x300x300 per batch and per image and at 8x21x512x512 per batch, ours and the
# authors', on the same GPU, and prints each ratio (theirs / ours: above 1 is faster).
set -Eeuo pipefail
trap 'echo "gpu-check: failed at line $LINENO" >&2' ERR
cd "$(dirname "$0")/.."
out=gpu-check

build() {
  cargo fetch -q
  eval "$(bash .ci/cuda-toolkit.sh --link)"
  mkdir -p "$out/bin" "$out/reference"
  local log
  log=$(cargo test -p lovasz-candle --features cuda --test cuda --no-run 2>&1 | tee /dev/stderr)
  local test_bin
  test_bin=$(printf '%s\n' "$log" | sed -n 's/.*Executable tests\/cuda.rs (\(.*\))/\1/p' | tail -1)
  [ -n "$test_bin" ] || { echo "gpu-check: no CUDA test binary was built" >&2; exit 1; }
  log=$(cargo test -p lovasz-tests --features cuda --test reference --no-run 2>&1 | tee /dev/stderr)
  local reference_bin
  reference_bin=$(printf '%s\n' "$log" | sed -n 's/.*Executable tests\/reference.rs (\(.*\))/\1/p' | tail -1)
  [ -n "$reference_bin" ] || { echo "gpu-check: no reference test binary was built" >&2; exit 1; }
  log=$(cargo test -p lovasz-candle --features nccl --test nccl --no-run 2>&1 | tee /dev/stderr)
  local nccl_bin
  nccl_bin=$(printf '%s\n' "$log" | sed -n 's/.*Executable tests\/nccl.rs (\(.*\))/\1/p' | tail -1)
  [ -n "$nccl_bin" ] || { echo "gpu-check: no NCCL test binary was built" >&2; exit 1; }
  cargo build -p lovasz-candle --features cuda --example gpu_bench
  # The U-Net example as users build it for CUDA: release, cuDNN, with NCCL for
  # `--backend nccl` (a world of one: the GPU machine has no MPI launcher).
  cargo build --release -p unet-example --features cudnn,nccl --bin unet-example --example step_time
  # Stripped and xz-compressed (candle's kernels make each binary ~50 MiB, ~6 MiB packed).
  strip -o "$out/bin/cuda-tests" "$test_bin"
  strip -o "$out/bin/reference-tests" "$reference_bin"
  strip -o "$out/bin/nccl-tests" "$nccl_bin"
  strip -o "$out/bin/gpu_bench" target/debug/examples/gpu_bench
  strip -o "$out/bin/unet-example" target/release/unet-example
  strip -o "$out/bin/step_time" target/release/examples/step_time
  xz -f -6 "$out/bin/cuda-tests" "$out/bin/reference-tests" "$out/bin/nccl-tests" "$out/bin/gpu_bench" \
    "$out/bin/unet-example" "$out/bin/step_time"
  cp lovasz-candle/benches/gpu_reference.py unet-example/benches/unet_twin.py "$out/"
  cp "${REFERENCE:-../shared/reference/lovasz_losses.py}" "$out/reference/lovasz_losses.py"
  du -ch "$out"/bin/* | tail -1
  local bytes
  bytes=$(du -cb "$out" | tail -1 | cut -f1)
  if [ "$bytes" -gt $((60 << 20)) ]; then
    echo "gpu-check: $out holds $bytes bytes, over 60 MiB" >&2
    exit 1
  fi
}

median() { sed -n 's/^median_s=//p' | tail -1; }

# Runs a command while sampling the GPU's used memory every 100 ms; prints the command's
# output, then `peak_mib=N`: the most used above what was used before it started.
with_peak_memory() {
  local base samples pid peak
  base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  samples=$(mktemp)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$samples" &
  pid=$!
  "$@"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  peak=$(sort -n "$samples" | tail -1)
  echo "peak_mib=$((${peak:-$base} - base))"
  rm -f "$samples"
}

ms() { grep -o '[0-9.]* ms/step' | head -1 | cut -d' ' -f1; }

loss_part() {
  local bin=$1 py=$2
  echo "== CUDA tests (lovasz-candle/tests/cuda.rs)"
  timeout 300 "$bin/cuda-tests" --test-threads=1
  echo "== NcclGroup, a world of one (lovasz-candle/tests/nccl.rs)"
  timeout 120 "$bin/nccl-tests" --test-threads=1
  echo "== the reference fixtures, on the CPU paths and on CUDA (tests/tests/reference.rs)"
  LOVASZ_FIXTURES=tests/fixtures timeout 120 "$bin/reference-tests" --test-threads=1
  echo "== fwd+bwd of the Lovasz-Softmax, ours vs the authors' PyTorch code, same GPU"
  local shape flag ours theirs line
  for spec in "10,20,300,300:" "10,20,300,300:--per-image" "8,21,512,512:"; do
    shape=${spec%%:*}
    flag=${spec#*:}
    line=$(timeout 120 "$bin/gpu_bench" --shape "$shape" $flag)
    printf '%s\n' "$line" | head -1
    ours=$(printf '%s\n' "$line" | median)
    line=$(timeout 180 "$py" "$out/gpu_reference.py" --reference "$out/reference/lovasz_losses.py" --shape "$shape" $flag)
    printf '%s\n' "$line" | head -1
    theirs=$(printf '%s\n' "$line" | median)
    "$py" -c "print(f'ratio $shape $flag: authors / ours = {$theirs / $ours:.2f}x')"
  done
}

unet_part() {
  local bin=$1 py=$2 tmp
  tmp=$(mktemp -d)
  echo "== the default train on CUDA (release, cuDNN, candle's layers)"
  local start=$SECONDS
  # A failed or timed-out run is reported and the step times still measured.
  with_peak_memory timeout 300 "$bin/unet-example" train --device cuda -q -o "$tmp/run" |
    tail -30 || unet_failed=1
  echo "wall_s=$((SECONDS - start))"
  [ -f "$tmp/run/summary.json" ] && "$py" - "$tmp/run/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
t = s["test"]
vals = [c["iou"] for c in t["classes"]]
above = sum(1 for v in vals if v is not None and v > 0)
print(f"test mIoU {100 * t['mean_iou']:.1f} %, classes above 0: {above} of {len(vals)}, device {s['device']}, train {s['train_seconds']:.0f} s")
PY
  echo "== train --backend nccl (a world of one) against train, on CUDA: the same losses"
  local small=(train -q --device cuda --dataset shapes:32:16 --epochs 3 --finetune-epochs 1
    --depth 3 --base-width 4 --batch-size 4 --norm group:2 --overwrite)
  if timeout 120 "$bin/unet-example" "${small[@]}" -o "$tmp/plain" >/dev/null &&
    timeout 120 "$bin/unet-example" "${small[@]}" --backend nccl -o "$tmp/nccl" >/dev/null; then
    "$py" - "$tmp/plain" "$tmp/nccl" <<'PY' || unet_failed=1
import csv, sys
rows = [list(csv.DictReader(open(f"{d}/metrics.csv"))) for d in sys.argv[1:]]
worst = max(abs(float(a[k]) - float(b[k])) / abs(float(a[k]))
            for a, b in zip(*rows) for k in ("loss", "ce") if a[k])
print(f"nccl vs plain: {len(rows[1])} epochs, largest relative loss difference {worst:.1e}")
assert len(rows[0]) == len(rows[1]) == 3 and worst <= 1e-5
PY
  else
    echo "gpu-check: a small CUDA run failed" >&2
    unet_failed=1
  fi
  echo "== step time, ours / PyTorch twin, same GPU, same batch (cuDNN on both)"
  local cfg width batch mode o t
  for cfg in "12:4" "32:32"; do
    width=${cfg%%:*}
    batch=${cfg#*:}
    "$bin/step_time" --batch-size "$batch" --write-batch "$tmp/batch" >/dev/null
    for mode in ce lovasz; do
      line=$(with_peak_memory timeout 120 "$bin/step_time" 20 --device cuda --mode "$mode" \
        --base-width "$width" --batch-size "$batch")
      printf '%s\n' "$line" | grep -E 'ms/step|peak_mib' | tr '\n' ' '
      echo
      o=$(printf '%s\n' "$line" | ms)
      line=$(with_peak_memory timeout 120 "$py" "$out/unet_twin.py" --batch "$tmp/batch" \
        --reference "$out/reference/lovasz_losses.py" --steps 20 --mode "$mode" \
        --base-width "$width" --device cuda)
      printf '%s\n' "$line" | grep -E 'ms/step|peak_mib' | tr '\n' ' '
      echo
      t=$(printf '%s\n' "$line" | ms)
      "$py" -c "print(f'step ratio width $width batch $batch $mode: ours / torch = {$o / $t:.2f}')"
    done
  done
  rm -rf "$tmp"
}

run() {
  local parts=${1:-loss,unet}
  local py=${PYTHON:-/opt/torch/.venv/bin/python3}
  local bin
  bin=$(mktemp -d)
  for name in cuda-tests reference-tests nccl-tests gpu_bench unet-example step_time; do
    "$py" -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.open(sys.argv[1]).read())' \
      "$out/bin/$name.xz" "$bin/$name"
    chmod +x "$bin/$name"
  done
  local site
  site=$("$py" -c 'import site; print(site.getsitepackages()[0])')
  local libs
  libs=$(ls -d "$site"/nvidia/*/lib 2>/dev/null | tr '\n' ':' || true)
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  case ",$parts," in *,loss,*) loss_part "$bin" "$py" ;; esac
  unet_failed=0
  case ",$parts," in *,unet,*) unet_part "$bin" "$py" ;; esac
  if [ "$unet_failed" -ne 0 ]; then
    echo "gpu-check: the CUDA training run failed" >&2
    exit 1
  fi
}

case "${1:-}" in
  build) build ;;
  run) run "${2:-}" ;;
  *) echo "usage: $0 build | run [loss,unet]" >&2; exit 2 ;;
esac
