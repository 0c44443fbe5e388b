#!/usr/bin/env bash
# The Metal build, on Linux: type-checks and lints (clippy, -D warnings, all targets)
# lovasz-candle and unet-example with `metal` for aarch64-apple-darwin. This proves that
# they compile and lint for Apple Silicon; it does not run anything on a Mac.
#
# How: Debian's Rust 1.96 (rustc-web, cargo-web, rust-web-src, rust-web-clippy from
# bookworm-security, installed here when missing) builds the standard library for the
# target from its sources (`-Zbuild-std`, allowed on a stable compiler by
# RUSTC_BOOTSTRAP=1). Type-checking needs no linker and no Apple SDK. /usr/bin comes
# first in PATH so that rustup's toolchain is not paired with Debian's library sources.
# The target folder is its own (METAL_TARGET_DIR, default ~/.cache/lovasz-candle/metal):
# about 15 minutes cold on 2 cores, seconds warm.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! /usr/bin/rustc --version 2>/dev/null | grep -q '^rustc 1\.9[6-9]' ||
  [ ! -d /usr/lib/rustlib/src/rust/library ] || [ ! -x /usr/bin/cargo-clippy ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
    rustc-web cargo-web rust-web-src rust-web-clippy >/dev/null
fi

export PATH="/usr/bin:$PATH"
export RUSTC=/usr/bin/rustc
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${METAL_TARGET_DIR:-$HOME/.cache/lovasz-candle/metal}"
/usr/bin/cargo --version
/usr/bin/cargo clippy -p lovasz-candle -p unet-example \
  --features lovasz-candle/metal,unet-example/metal --all-targets \
  -Zbuild-std=std,panic_abort --target aarch64-apple-darwin -- -D warnings
