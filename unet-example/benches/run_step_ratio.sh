#!/usr/bin/env bash
# Times a training step of the default U-Net in this project and in its PyTorch twin
# (benches/unet_twin.py), side by side on the same batch, and prints ours / PyTorch's.
#
#   bash unet-example/benches/run_step_ratio.sh [ROUNDS] [STEPS]
#
# Environment:
#   PYTHON            a Python with torch and numpy (default: python3)
#   LOVASZ_REFERENCE  the authors' lovasz_losses.py (github.com/bermanmaxim/LovaszSoftmax,
#                     pytorch/lovasz_losses.py); default: ../shared/reference/lovasz_losses.py
#   BASE_WIDTH        channels of the U-Net's first level on both sides (default 12, the
#                     default model; 8 is the pilot's)
#
# Each round runs, one after the other: ours CE, PyTorch CE, ours CE + Lovász, PyTorch
# CE + Lovász (STEPS timed steps each, after one warm-up step), so machine drift hits
# both sides alike. The ratio < 1 means we are faster.
set -euo pipefail
rounds=${1:-3}
steps=${2:-20}
root=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-python3}
reference=${LOVASZ_REFERENCE:-$root/../shared/reference/lovasz_losses.py}
if [[ ! -f $reference ]]; then
  echo "error: the authors' lovasz_losses.py is not at $reference; set LOVASZ_REFERENCE" >&2
  exit 2
fi
if ! "$python" -c "import torch, numpy" 2>/dev/null; then
  echo "error: $python cannot import torch and numpy; set PYTHON to a Python that can" >&2
  exit 2
fi
cd "$root"
cargo build --release -q -p unet-example --example step_time
bin=$root/target/release/examples/step_time
batch=$(mktemp)
trap 'rm -f "$batch"' EXIT
"$bin" --write-batch "$batch" >/dev/null
threads=$(nproc)
width=${BASE_WIDTH:-12}

ms() { grep -o '[0-9.]* ms/step' | head -1 | cut -d' ' -f1; }
ours() { "$bin" "$steps" --mode "$1" --base-width "$width" | ms; }
torch() {
  "$python" "$root/unet-example/benches/unet_twin.py" --batch "$batch" \
    --reference "$reference" --steps "$steps" --mode "$1" --threads "$threads" \
    --base-width "$width" | ms
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { print a / b }'; }
declare -a r_ce r_lov
for ((i = 1; i <= rounds; i++)); do
  ours_ce=$(ours ce)
  torch_ce=$(torch ce)
  ours_lov=$(ours lovasz)
  torch_lov=$(torch lovasz)
  rc=$(ratio "$ours_ce" "$torch_ce")
  rl=$(ratio "$ours_lov" "$torch_lov")
  r_ce+=("$rc")
  r_lov+=("$rl")
  printf 'round %d: CE ours %6.1f ms, torch %6.1f ms, ratio %.2f | CE+Lovasz ours %6.1f ms, torch %6.1f ms, ratio %.2f\n' \
    "$i" "$ours_ce" "$torch_ce" "$rc" "$ours_lov" "$torch_lov" "$rl"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
printf 'median ratio ours/torch over %d rounds (%d threads, base width %d): CE %.2f, CE+Lovasz %.2f\n' \
  "$rounds" "$threads" "$width" "$(median "${r_ce[@]}")" "$(median "${r_lov[@]}")"
