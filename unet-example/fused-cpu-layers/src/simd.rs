//! Loops compiled for AVX2 where the CPU has it. The crate is built for baseline x86-64
//! (SSE2) unless the user asks for more, so its element-wise loops use 4-lane vectors;
//! [`vectorised`] runs a closure inside a function compiled with AVX2 enabled, where
//! LLVM inlines the closure and widens its loops to 8 lanes. The results are bit for
//! bit the same: the same f32 operations in the same order per value, with no fused
//! multiply-add (Rust never contracts `a * b + c`). `FUSED_CPU_LAYERS_ISA=none` turns
//! it off.

/// Runs `f`, compiled for AVX2 where the CPU has it (and `FUSED_CPU_LAYERS_ISA` is not
/// `none`). Mark the closure `#[inline(always)]`: a closure left out of line is compiled
/// for the baseline (seen for batch norm's backward before it was marked).
#[inline(always)]
pub(crate) fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU has AVX2.
        return unsafe { avx2(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Whether [`vectorised`] (and [`super::sums::lane_dots4`]) take the AVX2 path.
#[cfg(target_arch = "x86_64")]
pub(crate) fn use_avx2() -> bool {
    #[cfg(test)]
    if tests::PORTABLE.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    super::direct::Isa::best().is_some() && is_x86_feature_detected!("avx2")
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    /// Set while [`portable`] runs: every thread then takes the portable path. Other
    /// tests running meanwhile only see the same bits computed another way.
    pub(super) static PORTABLE: AtomicBool = AtomicBool::new(false);

    /// Runs `f` with [`super::vectorised`] on its portable path, on every thread.
    pub(crate) fn portable<R>(f: impl FnOnce() -> R) -> R {
        static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
        let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        PORTABLE.store(true, Ordering::Relaxed);
        let r = f();
        PORTABLE.store(false, Ordering::Relaxed);
        r
    }
}
