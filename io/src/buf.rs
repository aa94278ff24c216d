//! Aligned buffers and the bounded pool they come from.
//!
//! [`AlignedBuf`] is a heap allocation aligned to [`BUF_ALIGN`] (4096), zeroed when first
//! allocated, with a length (bytes in use) and a fixed capacity. It implements monoio's
//! `IoBuf`/`IoBufMut`, so it can be handed to the ring by value, and converts into
//! [`Bytes`] without copying ([`AlignedBuf::into_bytes`]).
//!
//! [`BufPool`] bounds how much buffer memory a shard may hold: each pooled buffer holds a
//! permit of the pool's semaphore until it is dropped, wherever that happens (a buffer
//! sent to a front-end thread as `Bytes` returns its memory and permit from there).
//! Taking a buffer from an exhausted pool waits; that wait is the back-pressure that
//! bounds in-flight I/O memory.

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Alignment of every buffer: covers 512-byte and 4 KiB logical blocks and page-granular
/// DMA pinning.
pub const BUF_ALIGN: usize = 4096;

/// A zero-initialised, [`BUF_ALIGN`]-aligned byte buffer with a fixed capacity.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    capacity: usize,
    len: usize,
    home: Option<PoolHome>,
}

struct PoolHome {
    pool: Arc<PoolInner>,
    _permit: OwnedSemaphorePermit,
}

// SAFETY: an AlignedBuf uniquely owns its allocation (like a Box<[u8]>); nothing else
// aliases `ptr`, so moving it to or sharing `&` references with another thread is sound.
#[allow(unsafe_code)]
unsafe impl Send for AlignedBuf {}
// SAFETY: `&AlignedBuf` only gives read access to initialised bytes.
#[allow(unsafe_code)]
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A new zeroed buffer of `capacity` bytes (rounded up to [`BUF_ALIGN`]), length 0.
    pub fn zeroed(capacity: usize) -> AlignedBuf {
        let capacity = round_up(capacity.max(1), BUF_ALIGN);
        let layout = Layout::from_size_align(capacity, BUF_ALIGN).expect("buffer layout");
        // SAFETY: the layout has a non-zero size.
        #[allow(unsafe_code)]
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf {
            ptr,
            capacity,
            len: 0,
            home: None,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Free bytes after `len`.
    pub fn remaining(&self) -> usize {
        self.capacity - self.len
    }

    /// Sets the length. Bytes up to `capacity` are always initialised (zeroed at
    /// allocation), so any length up to the capacity is sound.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity,
            "len {len} > capacity {}",
            self.capacity
        );
        self.len = len;
    }

    /// Appends as much of `data` as fits; returns how many bytes were taken.
    pub fn extend_from_slice(&mut self, data: &[u8]) -> usize {
        let take = data.len().min(self.remaining());
        let start = self.len;
        self.full_mut()[start..start + take].copy_from_slice(&data[..take]);
        self.len += take;
        take
    }

    /// Zeroes from `len` up to `new_len` and sets the length to `new_len`.
    pub fn pad_zeroed_to(&mut self, new_len: usize) {
        assert!(new_len >= self.len && new_len <= self.capacity);
        let start = self.len;
        self.full_mut()[start..new_len].fill(0);
        self.len = new_len;
    }

    /// The bytes in use.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for `capacity` initialised bytes and `len <= capacity`.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(self.ptr.as_ptr(), self.len)
        }
    }

    /// Every byte of the capacity, for filling.
    pub fn full_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for `capacity` initialised bytes, uniquely borrowed here.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity)
        }
    }

    /// The buffer's bytes in use as [`Bytes`], without copying. The memory (and pool
    /// permit) is released when the last `Bytes` referring to it is dropped.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AlignedBuf(len {}, capacity {})",
            self.len, self.capacity
        )
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            if home.pool.recycle(self.ptr, self.capacity) {
                return; // the pool keeps the allocation; the permit drops with `home`
            }
        }
        let layout = Layout::from_size_align(self.capacity, BUF_ALIGN).expect("buffer layout");
        // SAFETY: ptr was allocated with exactly this layout and is not used after this.
        #[allow(unsafe_code)]
        unsafe {
            alloc::dealloc(self.ptr.as_ptr(), layout)
        }
    }
}

// SAFETY: ptr stays valid and does not move while the buffer is owned by the runtime;
// `len` initialised bytes start at it.
#[allow(unsafe_code)]
unsafe impl monoio::buf::IoBuf for AlignedBuf {
    fn read_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    fn bytes_init(&self) -> usize {
        self.len
    }
}

// SAFETY: ptr is valid for `capacity` writable bytes, which are all initialised (zeroed
// at allocation), so `set_init` up to the capacity never exposes uninitialised memory.
#[allow(unsafe_code)]
unsafe impl monoio::buf::IoBufMut for AlignedBuf {
    fn write_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn bytes_total(&mut self) -> usize {
        self.capacity
    }

    unsafe fn set_init(&mut self, pos: usize) {
        self.len = pos;
    }
}

/// A bounded pool of equal-sized aligned buffers. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct BufPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    buf_bytes: usize,
    permits: Arc<Semaphore>,
    free: Mutex<Vec<FreeBuf>>,
    max_free: usize,
}

struct FreeBuf(NonNull<u8>);
// SAFETY: a FreeBuf is an unaliased allocation owned only by the pool's free list.
#[allow(unsafe_code)]
unsafe impl Send for FreeBuf {}

impl BufPool {
    /// A pool of at most `count` buffers of `buf_bytes` each (rounded up to BUF_ALIGN).
    pub fn new(buf_bytes: usize, count: usize) -> BufPool {
        assert!(count > 0);
        let buf_bytes = round_up(buf_bytes.max(1), BUF_ALIGN);
        BufPool {
            inner: Arc::new(PoolInner {
                buf_bytes,
                permits: Arc::new(Semaphore::new(count)),
                free: Mutex::new(Vec::new()),
                max_free: count,
            }),
        }
    }

    pub fn buf_bytes(&self) -> usize {
        self.inner.buf_bytes
    }

    /// Buffers that may still be taken without waiting.
    pub fn available(&self) -> usize {
        self.inner.permits.available_permits()
    }

    /// Takes a buffer (length 0), waiting while the pool is exhausted.
    pub async fn take(&self) -> AlignedBuf {
        let permit = self
            .inner
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the pool's semaphore is never closed");
        self.wrap(permit)
    }

    /// Takes a buffer if one is available now.
    pub fn try_take(&self) -> Option<AlignedBuf> {
        let permit = self.inner.permits.clone().try_acquire_owned().ok()?;
        Some(self.wrap(permit))
    }

    fn wrap(&self, permit: OwnedSemaphorePermit) -> AlignedBuf {
        let recycled = self.inner.free.lock().expect("pool lock").pop();
        let mut buf = match recycled {
            Some(FreeBuf(ptr)) => AlignedBuf {
                ptr,
                capacity: self.inner.buf_bytes,
                len: 0,
                home: None,
            },
            None => AlignedBuf::zeroed(self.inner.buf_bytes),
        };
        buf.home = Some(PoolHome {
            pool: self.inner.clone(),
            _permit: permit,
        });
        buf
    }
}

impl PoolInner {
    /// Keeps an allocation for reuse; false if the free list is full.
    fn recycle(&self, ptr: NonNull<u8>, capacity: usize) -> bool {
        if capacity != self.buf_bytes {
            return false;
        }
        let mut free = self.free.lock().expect("pool lock");
        if free.len() >= self.max_free {
            return false;
        }
        free.push(FreeBuf(ptr));
        true
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.buf_bytes, BUF_ALIGN).expect("buffer layout");
        for FreeBuf(ptr) in self.free.get_mut().expect("pool lock").drain(..) {
            // SAFETY: every free-list entry was allocated with this layout and is unused.
            #[allow(unsafe_code)]
            unsafe {
                alloc::dealloc(ptr.as_ptr(), layout)
            }
        }
    }
}

/// `value` rounded up to a multiple of `align` (a power of two).
pub fn round_up(value: usize, align: usize) -> usize {
    debug_assert!(align.is_power_of_two());
    (value + align - 1) & !(align - 1)
}

/// `value` rounded up to a multiple of `align` (a power of two).
pub fn round_up_u64(value: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    (value + align - 1) & !(align - 1)
}

/// `value` rounded down to a multiple of `align` (a power of two).
pub fn round_down_u64(value: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    value & !(align - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_zeroed() {
        let mut buf = AlignedBuf::zeroed(5000);
        assert_eq!(buf.capacity(), 8192);
        assert_eq!(buf.full_mut().as_ptr() as usize % BUF_ALIGN, 0);
        assert!(buf.full_mut().iter().all(|&b| b == 0));
        assert_eq!(buf.extend_from_slice(&[1; 10_000]), 8192);
        assert_eq!(buf.remaining(), 0);
    }

    #[test]
    fn into_bytes_does_not_copy() {
        let mut buf = AlignedBuf::zeroed(4096);
        buf.extend_from_slice(b"hello");
        let address = buf.as_slice().as_ptr();
        let bytes = buf.into_bytes();
        assert_eq!(&bytes[..], b"hello");
        assert_eq!(bytes.as_ptr(), address);
        assert_eq!(bytes.slice(1..3).as_ptr(), address.wrapping_add(1));
    }

    #[test]
    fn the_pool_is_bounded_and_recycles() {
        let pool = BufPool::new(4096, 2);
        let a = pool.try_take().expect("first");
        let b = pool.try_take().expect("second");
        assert!(pool.try_take().is_none(), "a third buffer must wait");
        let address = a.as_slice().as_ptr();
        drop(a);
        let c = pool.try_take().expect("freed permit");
        assert_eq!(c.as_slice().as_ptr(), address, "allocation reused");
        // A pooled buffer travelling as Bytes holds its permit until the Bytes is gone.
        let bytes = b.into_bytes();
        assert!(pool.try_take().is_none());
        drop(bytes);
        assert!(pool.try_take().is_some());
    }
}
