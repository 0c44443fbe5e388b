#!/usr/bin/env bash
# Installs a CUDA 13.0 compiler toolchain from PyPI wheels (no GPU, no driver needed) and
# prints the environment for building lovasz-candle with `--features cuda` on a machine
# without a GPU:
#
#   eval "$(bash .ci/cuda-toolkit.sh)"          # nvcc, the runtime and CUB headers
#   cargo check -p lovasz-candle --features cuda --all-targets
#
#   eval "$(bash .ci/cuda-toolkit.sh --link)"   # also what linking a CUDA binary needs
#
# `--link` adds the cuBLAS, cuRAND and NVRTC wheels (candle links them) and a folder of
# unversioned names for the linker, with a stub libcuda.so (SONAME libcuda.so.1, the
# driver's) defining every driver function cudarc declares, and likewise a stub
# libcudnn.so (SONAME libcudnn.so.9) for builds with `cudnn` and a stub libnccl.so
# (SONAME libnccl.so.2) for builds with `nccl` (read from their sources in
# cargo's registry: run `cargo fetch` first); the real driver replaces it at run time on
# a GPU machine.
# CUDA_WHEELS_DIR (default ~/.cache/cuda-wheels-13.0) holds it all, installed once.
set -eu
dir=${CUDA_WHEELS_DIR:-$HOME/.cache/cuda-wheels-13.0}
link=0
if [ "${1:-}" = "--link" ]; then link=1; shift; fi
if ! ls "$dir"/venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc >/dev/null 2>&1; then
  python3 -m venv "$dir/venv" >&2
  "$dir/venv/bin/pip" install -q \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" \
    "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" >&2
fi
root=$(ls -d "$dir"/venv/lib/python3*/site-packages/nvidia/cu13 | head -1)
[ -x "$root/bin/nvcc" ] || { echo "echo 'cuda-toolkit.sh: nvcc missing under $root' >&2; false"; exit 1; }
cat <<OUT
export CUDA_HOME="$root"
export CUDA_ROOT="$root"
export NVCC="$root/bin/nvcc"
export PATH="$root/bin:\$PATH"
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
OUT
[ "$link" = 1 ] || exit 0
if [ ! -e "$root/lib/libcublas.so.13" ]; then
  "$dir/venv/bin/pip" install -q "nvidia-cublas==13.*" "nvidia-curand==10.*" \
    "nvidia-cuda-nvrtc==13.0.*" >&2
fi
ld="$dir/link"
mkdir -p "$ld"
for name in cudart cublas cublasLt nvrtc; do ln -sf "$root/lib/lib$name.so.13" "$ld/lib$name.so"; done
ln -sf "$root/lib/libcurand.so.10" "$ld/libcurand.so"
# The stub driver: one empty function per driver function cudarc declares.
sys_rs=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | tail -1)
[ -n "$sys_rs" ] || { echo "echo 'cuda-toolkit.sh: cudarc sources missing (run cargo fetch)' >&2; false"; exit 1; }
stub="$ld/libcuda-stub.c"
grep -o 'pub unsafe fn cu[A-Za-z0-9_]*(' "$sys_rs" | sed 's/pub unsafe fn //; s/($//' | sort -u \
  | sed 's/.*/void &(void) {}/' > "$stub"
gcc -shared -fPIC -o "$ld/libcuda.so" -Wl,-soname,libcuda.so.1 "$stub" >&2
# The same for cuDNN (unet-example's `cudnn` feature links it): a stub with cuDNN 9's
# SONAME, replaced at run time by the real library (pip's nvidia-cudnn-cu13).
cudnn_rs=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/cudnn/sys/mod.rs 2>/dev/null | tail -1)
[ -n "$cudnn_rs" ] || { echo "echo 'cuda-toolkit.sh: cudarc sources missing (run cargo fetch)' >&2; false"; exit 1; }
grep -o 'pub unsafe fn cudnn[A-Za-z0-9_]*(' "$cudnn_rs" | sed 's/pub unsafe fn //; s/($//' | sort -u \
  | sed 's/.*/void &(void) {}/' > "$ld/libcudnn-stub.c"
gcc -shared -fPIC -o "$ld/libcudnn.so" -Wl,-soname,libcudnn.so.9 "$ld/libcudnn-stub.c" >&2
# And for NCCL (the `nccl` features link it): a stub with NCCL 2's SONAME, replaced at
# run time by the real library (pip's nvidia-nccl-cu13).
nccl_rs=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/nccl/sys/mod.rs 2>/dev/null | tail -1)
[ -n "$nccl_rs" ] || { echo "echo 'cuda-toolkit.sh: cudarc sources missing (run cargo fetch)' >&2; false"; exit 1; }
grep -o 'pub unsafe fn nccl[A-Za-z0-9_]*(' "$nccl_rs" | sed 's/pub unsafe fn //; s/($//' | sort -u \
  | sed 's/.*/void &(void) {}/' > "$ld/libnccl-stub.c"
gcc -shared -fPIC -o "$ld/libnccl.so" -Wl,-soname,libnccl.so.2 "$ld/libnccl-stub.c" >&2
echo "export LIBRARY_PATH=\"$ld\${LIBRARY_PATH:+:\$LIBRARY_PATH}\""
