//! Benchmark content: a pool of random bytes generated before any timing starts, and
//! blobs cut from it without copying.
//!
//! A blob is named by a number. Its chunk `j` is a window of the pool (`Bytes::slice`,
//! a reference-count bump, so the timed path never generates or copies content):
//!
//! - chunk 0 of blob `id` starts at pool offset `id` (mod the number of start
//!   positions), so no two blobs of a run share their first chunk and every blob of a
//!   run is a distinct byte string (content-addressed deduplication cannot merge them);
//! - chunk `j > 0` starts at a pseudo-random offset derived from (seed, id, j), so
//!   large blobs do not repeat the pool end to end.
//!
//! The pool is drawn from a seeded generator; the seed is random per run unless given,
//! so blobs of two runs against the same server are distinct too. Random bytes do not
//! compress. What this does not defeat: a store that deduplicated shifted content
//! (content-defined chunking) could find overlap between windows; Graviton deduplicates
//! whole blobs only (`CONTRACT.md`, "Keys").
//!
//! Invariant: the pool is at least one chunk long; blob ids below `distinct_blobs()` are
//! guaranteed distinct.

use bytes::{Bytes, BytesMut};
use rand::{rngs::SmallRng, RngCore, SeedableRng};

/// Random bytes shared by every blob of a run.
#[derive(Clone)]
pub struct Pool {
    bytes: Bytes,
    seed: u64,
}

impl Pool {
    /// Fills `len_bytes` with random bytes from `seed`. Call before timing starts.
    pub fn generate(len_bytes: usize, seed: u64) -> Pool {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut bytes = BytesMut::zeroed(len_bytes.max(1));
        rng.fill_bytes(&mut bytes);
        Pool {
            bytes: bytes.freeze(),
            seed,
        }
    }

    pub fn len_bytes(&self) -> usize {
        self.bytes.len()
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The blob `id` of `size_bytes`, cut into chunks of `chunk_bytes`.
    pub fn blob(&self, id: u64, size_bytes: u64, chunk_bytes: usize) -> Blob {
        assert!(chunk_bytes > 0, "chunk size must be positive");
        assert!(
            chunk_bytes <= self.bytes.len(),
            "chunk of {chunk_bytes} bytes exceeds the pool of {} bytes",
            self.bytes.len()
        );
        Blob {
            pool: self.clone(),
            id,
            size_bytes,
            chunk_bytes,
        }
    }

    /// How many start positions a window of `window_bytes` has in the pool: blob ids
    /// below this are distinct.
    pub fn distinct_blobs(&self, window_bytes: usize) -> u64 {
        (self.bytes.len() - window_bytes.min(self.bytes.len()) + 1) as u64
    }
}

/// One blob's content: a sequence of pool windows. Cheap to clone.
#[derive(Clone)]
pub struct Blob {
    pool: Pool,
    id: u64,
    size_bytes: u64,
    chunk_bytes: usize,
}

impl Blob {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn chunk_count(&self) -> u64 {
        self.size_bytes.div_ceil(self.chunk_bytes as u64)
    }

    /// Chunk `index` of the blob (the last one may be short).
    pub fn chunk(&self, index: u64) -> Bytes {
        let offset = index * self.chunk_bytes as u64;
        debug_assert!(offset < self.size_bytes);
        let len = (self.size_bytes - offset).min(self.chunk_bytes as u64) as usize;
        let span = self.pool.distinct_blobs(len);
        let start = if index == 0 {
            self.id % span
        } else {
            mix(self.pool.seed ^ mix(self.id) ^ index.rotate_left(32)) % span
        } as usize;
        self.pool.bytes.slice(start..start + len)
    }

    /// The chunks in order, each with its offset in the blob.
    pub fn chunks(&self) -> impl Iterator<Item = (u64, Bytes)> + Send + 'static {
        let blob = self.clone();
        (0..self.chunk_count())
            .map(move |index| (index * blob.chunk_bytes as u64, blob.chunk(index)))
    }

    /// True if `data` is the blob's content at `offset` (any length, any alignment).
    pub fn matches(&self, offset: u64, data: &[u8]) -> bool {
        let end = offset + data.len() as u64;
        if end > self.size_bytes {
            return false;
        }
        let chunk_bytes = self.chunk_bytes as u64;
        let mut position = offset;
        while position < end {
            let index = position / chunk_bytes;
            let chunk = self.chunk(index);
            let within = (position - index * chunk_bytes) as usize;
            let take = (chunk.len() - within).min((end - position) as usize);
            let got = &data[(position - offset) as usize..][..take];
            if &chunk[within..within + take] != got {
                return false;
            }
            position += take as u64;
        }
        true
    }

    /// The BLAKE3 digest of the content: the key Graviton must return for it.
    pub fn blake3(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        for (_, chunk) in self.chunks() {
            hasher.update(&chunk);
        }
        *hasher.finalize().as_bytes()
    }
}

/// SplitMix64's finaliser: a cheap, well-spread 64-bit mix.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn blobs_are_distinct_and_sized() {
        let pool = Pool::generate(1 << 16, 7);
        let mut seen = HashSet::new();
        for id in 0..200 {
            let blob = pool.blob(id, 10_000, 4096);
            let total: usize = blob.chunks().map(|(_, c)| c.len()).sum();
            assert_eq!(total, 10_000);
            assert!(seen.insert(blob.blake3()), "blob {id} repeats another");
        }
    }

    #[test]
    fn matches_any_slice_and_rejects_others() {
        let pool = Pool::generate(1 << 16, 9);
        let blob = pool.blob(3, 10_000, 4096);
        let whole: Vec<u8> = blob.chunks().flat_map(|(_, c)| c.to_vec()).collect();
        assert!(blob.matches(0, &whole));
        assert!(blob.matches(4000, &whole[4000..9000]));
        assert!(blob.matches(9999, &whole[9999..]));
        let mut wrong = whole[100..5000].to_vec();
        wrong[4000] ^= 1;
        assert!(!blob.matches(100, &wrong));
        assert!(!blob.matches(9999, &[0, 0]));
    }

    #[test]
    fn seeds_give_different_pools() {
        let a = Pool::generate(4096, 1).blob(0, 4096, 4096).blake3();
        let b = Pool::generate(4096, 2).blob(0, 4096, 4096).blake3();
        assert_ne!(a, b);
    }
}
