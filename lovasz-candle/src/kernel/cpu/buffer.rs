//! Large host buffers for the kernel, backed by transparent huge pages where Linux offers
//! them on request (`madvise` mode). A fresh 72 MB output touched in 4 KiB pages costs
//! about 18,000 page faults; in 2 MiB pages, 36.
//!
//! When one job is split over all threads (the binary losses per batch), its working
//! memory (sort keys and their scratch) is also kept between calls in a small cache, up
//! to [`CACHE_MAX_BYTES`]: a training loop calls the loss with the same shapes every step,
//! and fresh memory costs its page faults and the kernel's zeroing every time (measured on
//! the hinge at 10×300×300: about 1 ms of 10). The cache is emptied by
//! [`release_cached_buffers`].

use std::sync::{Mutex, MutexGuard};

/// Buffers below this size are left to the allocator as they are.
const HUGE_MIN_BYTES: usize = 2 << 20;

/// Types whose all-zero bit pattern is a valid value (their zero), so that fresh memory
/// from `calloc` is a vector of zeros.
///
/// # Safety
/// Only for types for which all-zero bytes are a valid value.
pub(crate) unsafe trait ZeroBits: Copy + Default {}

// SAFETY: all-zero bits are 0.0 for the floats and 0 for the integers.
unsafe impl ZeroBits for f32 {}
// SAFETY: as above.
unsafe impl ZeroBits for f64 {}
// SAFETY: as above.
unsafe impl ZeroBits for u64 {}
// SAFETY: as above.
unsafe impl ZeroBits for u128 {}

/// A vector of `n` zeros. Fresh memory from `calloc` is zero without being written (the
/// kernel clears each page at its first touch, on whichever thread touches it), and
/// advising it before that touch gets huge pages.
pub(crate) fn zeroed<T: ZeroBits>(n: usize) -> Vec<T> {
    let bytes = n.saturating_mul(std::mem::size_of::<T>());
    if bytes < HUGE_MIN_BYTES {
        return vec![T::default(); n];
    }
    let Ok(layout) = std::alloc::Layout::array::<T>(n) else {
        return vec![T::default(); n];
    };
    // SAFETY: `layout` has a non-zero size; a null result is handled. All-zero bytes are
    // a valid `T` (`ZeroBits`), and the vector takes the allocation with the same layout
    // (`Layout::array::<T>(n)`, capacity `n`), which is what `Vec` deallocates with.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut T;
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        advise_huge(ptr as *mut u8, bytes);
        Vec::from_raw_parts(ptr, n, n)
    }
}

/// Sets `v` to exactly `n` elements of working memory whose values are unspecified:
/// elements already there are kept as they are (not written again), new memory is zero
/// from `calloc` (no pass over it here).
pub(crate) fn working<T: ZeroBits>(v: &mut Vec<T>, n: usize) {
    if v.capacity() < n {
        // Old contents are not needed.
        *v = zeroed(n);
        return;
    }
    if v.len() < n {
        v.resize(n, T::default());
    }
    v.truncate(n);
}

/// The most working memory, in bytes, kept between calls.
pub const CACHE_MAX_BYTES: usize = 16 << 20;

/// Working buffers kept between calls, and their total size in bytes.
#[derive(Default)]
pub(crate) struct Cache<T> {
    free: Vec<Vec<T>>,
    bytes: usize,
}

impl<T> Cache<T> {
    /// An empty cache.
    const fn new() -> Self {
        Self {
            free: Vec::new(),
            bytes: 0,
        }
    }
}

/// Element types of cached working buffers: each has its cache.
pub(crate) trait Cached: ZeroBits + Send + 'static {
    fn cache() -> &'static Mutex<Cache<Self>>;
}

static CACHE_U64: Mutex<Cache<u64>> = Mutex::new(Cache::new());
static CACHE_U128: Mutex<Cache<u128>> = Mutex::new(Cache::new());

impl Cached for u64 {
    fn cache() -> &'static Mutex<Cache<u64>> {
        &CACHE_U64
    }
}

impl Cached for u128 {
    fn cache() -> &'static Mutex<Cache<u128>> {
        &CACHE_U128
    }
}

/// The cache holds plain buffers, whole whatever a panicking holder did: a poisoned lock
/// is used as it is.
fn lock<T>(m: &'static Mutex<Cache<T>>) -> MutexGuard<'static, Cache<T>> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn bytes_of<T>(v: &Vec<T>) -> usize {
    v.capacity() * std::mem::size_of::<T>()
}

impl<T> Cache<T> {
    /// The largest buffer kept (empty if none), with unspecified contents.
    fn take(&mut self) -> Vec<T> {
        let Some(largest) = (0..self.free.len()).max_by_key(|&i| self.free[i].capacity()) else {
            return Vec::new();
        };
        let v = self.free.swap_remove(largest);
        self.bytes -= bytes_of(&v);
        v
    }

    /// Keeps `v`, or frees it if the cache would exceed [`CACHE_MAX_BYTES`].
    fn give(&mut self, v: Vec<T>) {
        let bytes = bytes_of(&v);
        if bytes > 0 && self.bytes + bytes <= CACHE_MAX_BYTES {
            self.bytes += bytes;
            self.free.push(v);
        }
    }
}

/// A working buffer from the cache (the largest kept; empty if none), with unspecified
/// contents: size it with [`working`].
pub(crate) fn take_cached<T: Cached>() -> Vec<T> {
    lock(T::cache()).take()
}

/// Returns a working buffer to the cache, or frees it if the cache would exceed
/// [`CACHE_MAX_BYTES`].
pub(crate) fn give_cached<T: Cached>(v: Vec<T>) {
    lock(T::cache()).give(v)
}

/// Frees the working memory the Lovász kernel keeps between calls (at most
/// [`CACHE_MAX_BYTES`]); the next call allocates it again.
///
/// Only a job split over all threads (the binary losses per batch, or any loss with
/// fewer (group, class) jobs than rayon threads) keeps its two key buffers, 16 bytes per
/// pixel of the group for f32 inputs, when they fit.
///
/// ```
/// lovasz_candle::memory::release_cached_buffers();
/// assert_eq!(lovasz_candle::memory::cached_buffer_bytes(), 0);
/// ```
pub fn release_cached_buffers() {
    // Buffers and count are emptied under one lock (a buffer given back in between would
    // otherwise go uncounted), and freed after it.
    drop(std::mem::take(&mut *lock(&CACHE_U64)));
    drop(std::mem::take(&mut *lock(&CACHE_U128)));
}

/// The bytes of working memory the Lovász kernel keeps between calls now.
pub fn cached_buffer_bytes() -> usize {
    lock(&CACHE_U64).bytes + lock(&CACHE_U128).bytes
}

/// Asks for huge pages on the whole 2 MiB pages inside `[ptr, ptr + bytes)`. A hint only:
/// failures are ignored, and other systems do nothing.
#[cfg(target_os = "linux")]
fn advise_huge(ptr: *mut u8, bytes: usize) {
    const HUGE: usize = 2 << 20;
    let start = (ptr as usize).next_multiple_of(HUGE);
    let end = (ptr as usize + bytes) / HUGE * HUGE;
    if end > start {
        // SAFETY: the range lies inside one live allocation owned by the caller; madvise
        // with MADV_HUGEPAGE changes no contents.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_ptr: *mut u8, _bytes: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_buffers_are_zero_and_usable() {
        for n in [0usize, 5, (HUGE_MIN_BYTES / 4) + 3] {
            let mut v: Vec<f32> = zeroed(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x == 0.0));
            v.push(1.0);
            assert_eq!(v[n], 1.0);
        }
        let v: Vec<f64> = zeroed(HUGE_MIN_BYTES / 8 + 1);
        assert!(v.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn working_memory_has_the_asked_length() {
        let mut v = vec![5u64; 10];
        working(&mut v, 4);
        assert_eq!(v, vec![5; 4]);
        working(&mut v, 12);
        assert_eq!(v.len(), 12);
        working(&mut v, HUGE_MIN_BYTES / 8 + 1);
        assert_eq!(v.len(), HUGE_MIN_BYTES / 8 + 1);
    }

    #[test]
    fn the_cache_keeps_buffers_up_to_its_bound() {
        let mut cache = Cache::<u64>::default();
        assert_eq!(cache.take().capacity(), 0);
        cache.give(Vec::with_capacity(1000));
        cache.give(Vec::with_capacity(3000));
        cache.give(Vec::new());
        assert_eq!((cache.free.len(), cache.bytes), (2, 32_000));
        // Over the bound: freed, not kept.
        cache.give(Vec::with_capacity(CACHE_MAX_BYTES / 8));
        assert_eq!((cache.free.len(), cache.bytes), (2, 32_000));
        // The largest first.
        assert!(cache.take().capacity() >= 3000);
        assert_eq!(cache.bytes, 8000);
        assert!(cache.take().capacity() >= 1000);
        assert_eq!((cache.free.len(), cache.bytes), (0, 0));
    }
}
