#!/usr/bin/env bash
# The CUDA check of lovasz-candle, in two halves.
#
#   bash scripts/gpu-check.sh build   # here, without a GPU: builds the CUDA test binary
#                                     # and the GPU bench, stripped, into gpu-check/
#   bash scripts/gpu-check.sh run     # on the GPU machine, from the repository root
#
# `build` needs the toolkit of .ci/cuda-toolkit.sh (installed from PyPI on first use) and
# the authors' lovasz_losses.py (REFERENCE=path, default ../shared/reference/), copied
# into gpu-check/reference/ (an ignored folder: the file is not part of this project).
# `run` needs the driver, python3 with torch (PYTHON, default /opt/torch/.venv/bin/python3)
# and the NVIDIA wheels under its site-packages (cuBLAS, cuRAND, NVRTC, the runtime),
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
  cargo build -p lovasz-candle --features cuda --example gpu_bench
  # Stripped and xz-compressed (candle's kernels make each binary ~50 MiB, ~6 MiB packed).
  strip -o "$out/bin/cuda-tests" "$test_bin"
  strip -o "$out/bin/reference-tests" "$reference_bin"
  strip -o "$out/bin/gpu_bench" target/debug/examples/gpu_bench
  xz -f -6 "$out/bin/cuda-tests" "$out/bin/reference-tests" "$out/bin/gpu_bench"
  cp lovasz-candle/benches/gpu_reference.py "$out/"
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

run() {
  local py=${PYTHON:-/opt/torch/.venv/bin/python3}
  local bin
  bin=$(mktemp -d)
  for name in cuda-tests reference-tests gpu_bench; do
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
  echo "== CUDA tests (lovasz-candle/tests/cuda.rs)"
  timeout 300 "$bin/cuda-tests" --test-threads=1
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

case "${1:-}" in
  build) build ;;
  run) run ;;
  *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
