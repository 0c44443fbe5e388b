//! The entry points of `cuda/lovasz.cu` (built by `build.rs` into a static library): raw
//! device pointers and candle's stream in, a `cudaError_t` out (0 on success).

use std::ffi::{c_char, c_int, c_void};

/// The call's dims and codes as the CUDA code reads them (`Dims` in `lovasz.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub batch: u64,
    pub channels: u64,
    pub spatial: u64,
    pub seg_len: u64,
    pub channels_last: u32,
    /// 0: `|fg - x|`, 1: the hinge.
    pub kind: u32,
    /// 0: linear coefficients, 1: weights.
    pub output: u32,
    /// f64 input.
    pub wide: u32,
}

extern "C" {
    pub fn lc_error_string(code: c_int) -> *const c_char;
    pub fn lc_temp_bytes(elems: u64, wide: u32, bytes: *mut usize) -> c_int;
    pub fn lc_softmax(z: *const c_void, p: *mut c_void, d: Dims, stream: *mut c_void) -> c_int;
    pub fn lc_softmax_backward(
        p: *const c_void,
        a: *mut c_void,
        d: Dims,
        stream: *mut c_void,
    ) -> c_int;
    pub fn lc_scan_nan(
        x: *const c_void,
        n: u64,
        wide: u32,
        flag: *mut u32,
        stream: *mut c_void,
    ) -> c_int;
    pub fn lc_build_keys(
        x: *const c_void,
        labels: *const u32,
        jobs: *const c_void,
        elems: u64,
        d: Dims,
        keys: *mut u64,
        values: *mut c_void,
        stream: *mut c_void,
    ) -> c_int;
    pub fn lc_sort(
        temp: *mut c_void,
        temp_bytes: usize,
        keys0: *mut u64,
        keys1: *mut u64,
        values0: *mut c_void,
        values1: *mut c_void,
        elems: u64,
        job_bits: u32,
        d: Dims,
        current: *mut c_int,
        stream: *mut c_void,
    ) -> c_int;
    pub fn lc_count_foreground(
        temp: *mut c_void,
        temp_bytes: usize,
        values: *const c_void,
        elems: u64,
        wide: u32,
        counts: *mut u32,
        stream: *mut c_void,
    ) -> c_int;
    pub fn lc_walk(
        x: *const c_void,
        jobs: *const c_void,
        n_jobs: u64,
        blocks_per_job: u64,
        d: Dims,
        values: *const c_void,
        counts: *const u32,
        out: *mut c_void,
        partials: *mut f64,
        sums: *mut f64,
        stream: *mut c_void,
    ) -> c_int;
    pub fn lc_losses(
        sums: *const f64,
        nan: *const u32,
        groups: u64,
        wide: u32,
        losses: *mut c_void,
        stream: *mut c_void,
    ) -> c_int;
}

/// Turns the code a step returned into a `candle::Error` naming the step.
pub(crate) fn check(step: &str, code: c_int) -> candle::Result<()> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: cudaGetErrorString returns a static NUL-terminated string for any code.
    let text = unsafe { std::ffi::CStr::from_ptr(lc_error_string(code)) };
    candle::bail!(
        "lovasz cuda: {step} failed: {} (cudaError {code})",
        text.to_string_lossy()
    )
}
