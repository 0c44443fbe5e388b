#!/usr/bin/env bash
# Installs OpenMPI (the library, its headers and mpirun) and libclang (bindgen needs it to
# build the `mpi` crate's mpi-sys) for lovasz-candle's `mpi` feature. Does nothing when
# `mpicc` is already on the PATH.
set -eu
if command -v mpicc >/dev/null 2>&1; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y libopenmpi-dev openmpi-bin libclang-dev
