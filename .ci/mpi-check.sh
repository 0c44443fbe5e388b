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
