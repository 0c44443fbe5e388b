#!/usr/bin/env bash
# CI: lovasz-candle's `mpi` feature. Installs OpenMPI if needed, builds the mpi_check
# example and runs it as a world of one (no launcher, MPI's singleton start), then under
# mpirun with 2 and 3 ranks. Each rank compares the distributed losses over MpiGroup with
# one process on the whole batch and checks that ranks that disagree fail; any mismatch
# is a non-zero exit. `timeout` bounds every run, so a hang fails CI instead of stalling it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/openmpi.sh
cargo build -p lovasz-candle --features mpi --example mpi_check
bin="${CARGO_TARGET_DIR:-target}/debug/examples/mpi_check"
# CI containers run as root, which mpirun refuses without these.
launch=(mpirun --allow-run-as-root --oversubscribe)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
timeout 300 "$bin"
for n in 2 3; do
  timeout 300 "${launch[@]}" -np "$n" "$bin"
done

# unet-example over MPI: 2 ranks train the weights of one process, with group norm (no
# per-rank batch statistics) and with batch norm synchronised over the ranks (--sync-bn;
# candle's layers, whose batch norm is the same operations in both runs): every logged
# loss within 1e-5 relative and the same test mIoU. A run stopped and resumed on 2 ranks
# ends as the uninterrupted one. Then the bad starts: ranks started with different
# options, a global batch they do not divide, a rank killed in training: each must end
# the job with an error (and nothing written for the bad starts), not a hang.
cargo build -p unet-example --features mpi
unet="${CARGO_TARGET_DIR:-target}/debug/unet-example"
tmp="$(mktemp -d)"
common=(train -q --dataset shapes:32:16 --epochs 3 --finetune-epochs 1 --depth 3
  --base-width 4 --overwrite)
same() {
  python3 - "$1" "$2" <<'PY'
import csv, json, sys
one, two = sys.argv[1], sys.argv[2]
rows = [list(csv.DictReader(open(f"{d}/metrics.csv"))) for d in (one, two)]
assert len(rows[0]) == len(rows[1]) == 3, "three epochs each"
for a, b in zip(*rows):
    for k in ("loss", "ce", "lovasz"):
        if a[k] or b[k]:
            x, y = float(a[k]), float(b[k])
            assert abs(x - y) <= 1e-5 * abs(x), f"{two}: epoch {a['epoch']} {k}: {x} vs {y}"
m = [json.load(open(f"{d}/summary.json"))["test"]["mean_iou"] for d in (one, two)]
assert abs(m[0] - m[1]) <= 1e-9, f"{two}: test mIoU {m[0]} vs {m[1]}"
print(f"unet-example: {one} and {two} agree (test mIoU {m[0]:.4f})")
PY
}
gn=("${common[@]}" --batch-size 4 --norm group:2)
timeout 300 "$unet" "${gn[@]}" -o "$tmp/one"
timeout 300 "${launch[@]}" -np 2 "$unet" "${gn[@]}" -o "$tmp/two"
same "$tmp/one" "$tmp/two"
bn=("${common[@]}" --batch-size 4 --layers candle)
timeout 300 "$unet" "${bn[@]}" -o "$tmp/one-bn"
timeout 300 "${launch[@]}" -np 2 "$unet" "${bn[@]}" --sync-bn -o "$tmp/two-sync-bn"
same "$tmp/one-bn" "$tmp/two-sync-bn"
timeout 300 "${launch[@]}" -np 2 "$unet" "${gn[@]}" --stop-after-epochs 2 -o "$tmp/resumed"
timeout 300 "${launch[@]}" -np 2 "$unet" train -q --resume "$tmp/resumed"
same "$tmp/two" "$tmp/resumed"

# expect_failure NAME PATTERN MPIRUN-ARGS...: the job fails, its output holds PATTERN.
expect_failure() {
  local name="$1" pattern="$2" start=$SECONDS
  shift 2
  if timeout 120 "${launch[@]}" "$@" >"$tmp/$name.log" 2>&1; then
    echo "$name: the job did not fail" >&2
    exit 1
  fi
  grep -q "$pattern" "$tmp/$name.log" || {
    cat "$tmp/$name.log" >&2
    exit 1
  }
  echo "unet-example: $name ended the job in $((SECONDS - start)) s"
}
expect_failure different-options "batch_size is 4 on rank 0 and 8 on rank 1" \
  -np 1 "$unet" "${common[@]}" --batch-size 4 -o "$tmp/bad" : \
  -np 1 "$unet" "${common[@]}" --batch-size 8 -o "$tmp/bad"
expect_failure indivisible-batch "multiple of the 2 ranks" \
  -np 2 "$unet" "${common[@]}" --batch-size 3 -o "$tmp/bad"
test ! -e "$tmp/bad" || { echo "a bad start wrote $tmp/bad" >&2; exit 1; }
long=(train -q --dataset shapes:32:16 --epochs 40 --depth 3 --base-width 4 --batch-size 4)
expect_failure killed-rank "exited on signal 9" \
  -np 1 "$unet" "${long[@]}" -o "$tmp/killed" : \
  -np 1 timeout -s KILL 3 "$unet" "${long[@]}" -o "$tmp/killed"
# What the killed job saved resumes.
timeout 300 "${launch[@]}" -np 2 "$unet" train -q --resume "$tmp/killed" >/dev/null
test -f "$tmp/killed/summary.json"
rm -rf "$tmp"
