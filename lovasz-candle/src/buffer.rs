//! Large host buffers for the kernel, backed by transparent huge pages where Linux offers
//! them on request (`madvise` mode). A fresh 72 MB output touched in 4 KiB pages costs
//! about 18,000 page faults; in 2 MiB pages, 36.

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
}
