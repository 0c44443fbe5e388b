//! Switches that send the losses down the paths of other devices on the CPU, so that the
//! tests check those paths on any machine. They exist only with the `test-paths` feature
//! (which the crate's own tests turn on); without it the paths are chosen by the device
//! alone and these checks are constants.

#[cfg(feature = "test-paths")]
mod switches {
    use std::cell::Cell;

    thread_local! {
        static FORCE_HOST_COPY: Cell<bool> = const { Cell::new(false) };
        static FORCE_DEVICE_EMULATION: Cell<bool> = const { Cell::new(false) };
    }

    /// Forces, on the current thread, the path that devices without a kernel (Metal) take:
    /// inputs are copied to host memory instead of being read in place, and the loss is
    /// formed on the input's device from the host's coefficients. Results must not
    /// change. For tests only (feature `test-paths`).
    pub fn force_host_copy(on: bool) {
        FORCE_HOST_COPY.with(|f| f.set(on));
    }

    /// Runs, on the current thread, the CUDA path's composition on the CPU: the same
    /// planned chunks, keys, sorts, prefix counts and closed-form walk as the CUDA
    /// kernels, as host loops. Results must match the CPU kernel. For tests only (feature
    /// `test-paths`).
    pub fn force_device_emulation(on: bool) {
        FORCE_DEVICE_EMULATION.with(|f| f.set(on));
    }

    pub(crate) fn host_copy_forced() -> bool {
        FORCE_HOST_COPY.with(|f| f.get())
    }

    pub(crate) fn device_emulation_forced() -> bool {
        FORCE_DEVICE_EMULATION.with(|f| f.get())
    }
}

#[cfg(feature = "test-paths")]
pub use switches::*;

/// Whether the host-copy path is forced on this thread: never without `test-paths`.
#[cfg(not(feature = "test-paths"))]
pub(crate) fn host_copy_forced() -> bool {
    false
}

/// Whether the device emulation is forced on this thread: never without `test-paths`.
#[cfg(not(feature = "test-paths"))]
pub(crate) fn device_emulation_forced() -> bool {
    false
}
