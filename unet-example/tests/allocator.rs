//! `keep_freed_memory`: with it, large blocks come from glibc's heap and stay there when
//! freed, so the next training step reuses mapped memory. Its own test binary without
//! libtest's harness: the setting is process-wide, and only allocations of the main
//! thread (whose arena is the heap) are served from the heap; libtest runs tests on
//! threads of their own.

fn main() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    large_blocks_come_from_the_heap_and_stay_there();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn large_blocks_come_from_the_heap_and_stay_there() {
    let changed = unet_example::device::keep_freed_memory();
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        // The user's allocator settings win; nothing to check beyond that.
        assert!(
            !changed,
            "GLIBC_TUNABLES is set: the settings must be left alone"
        );
        return;
    }
    assert!(changed, "mallopt refused the settings");
    let bytes = 64 << 20;
    // SAFETY: `mallinfo2` only reads the allocator's statistics.
    let before = unsafe { libc::mallinfo2() };
    let block = std::hint::black_box(vec![1u8; bytes]);
    let during = unsafe { libc::mallinfo2() };
    assert_eq!(
        during.hblkhd, before.hblkhd,
        "a {bytes}-byte block was mapped on its own"
    );
    assert!(during.uordblks >= before.uordblks + bytes);
    drop(block);
    let after = unsafe { libc::mallinfo2() };
    assert_eq!(after.arena, during.arena, "the heap was trimmed");
    assert!(after.fordblks >= bytes, "the freed block left the heap");
    println!("allocator: large blocks come from the heap and stay there: ok");
}
