//! Giving the heap's free memory back to the kernel.
//!
//! glibc keeps memory a program freed inside its arenas, and can return only the free
//! space at an arena's top on its own. Rebuilding an index (recovery) and snapshotting
//! it (checkpoints) free many megabytes of temporaries that sit *below* the index's
//! long-lived entries, so without help they stay resident for as long as the process
//! runs: about 95 bytes per live blob after opening a store (BENCHMARKS.md §1).
//! [`release_free_heap`] asks glibc to hand every whole free page back (`malloc_trim`,
//! which `madvise`s free pages in the middle of an arena as well as trimming its top).
//!
//! It walks every arena's free memory and takes each arena's lock in turn, so it is
//! meant for rare moments: the end of recovery and of a checkpoint (every
//! `journal_bytes` of records), never the request path. On other C libraries it does
//! nothing.

/// Returns the heap's free pages to the kernel (glibc); a no-op elsewhere.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only reorganises the allocator's own free memory; it takes
    // the arenas' locks itself and invalidates no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}
