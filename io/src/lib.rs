//! Graviton's I/O layer: the only crate that knows about io_uring, alignment and `unsafe`.
//!
//! It owns:
//! - [`buf`]: page-aligned buffers that the kernel may DMA into, and the bounded pool
//!   each shard takes them from. A buffer is owned by whoever has it in flight; it turns
//!   into a [`bytes::Bytes`] without copying when it leaves the shard.
//! - [`disk`]: the small file interface the storage engine is written against ([`Disk`],
//!   [`DiskFile`]), and its real implementation, [`DirectDisk`]: files opened `O_DIRECT`
//!   and driven by the shard's monoio ring (io_uring, or the epoll fallback).
//! - [`memory`]: giving the heap's free pages back to the kernel after recovery and
//!   checkpoints, which free many temporaries below long-lived index entries.
//! - [`reaper`]: the background thread that closes files' last descriptors, so that
//!   freeing a removed file's blocks never stalls a shard thread.
//! - [`sim`]: a deterministic in-memory implementation of the same interface that can
//!   fail, tear, reorder and drop unsynced writes on a seed, for crash testing.
//! - [`shard`]: the shard thread: pinning, runtime and ring start-up, driver reporting.
//!
//! What it guarantees: every buffer handed to the kernel is aligned to
//! [`buf::BUF_ALIGN`] and stays owned (not borrowed) until the operation completes;
//! `sync_data` returns only after the kernel reported the file's data durable.

pub mod buf;
pub mod disk;
pub mod memory;
pub mod reaper;
pub mod shard;
pub mod sim;

pub use buf::{AlignedBuf, BufPool, BUF_ALIGN};
pub use disk::{DirectDisk, Disk, DiskFile, IoMode};
