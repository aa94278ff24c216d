//! A streamed blob's key (its BLAKE3 hash) and the CRC table of its 64 KiB chunks,
//! computed as its bytes arrive, with part of the work done by idle shards.
//!
//! Why the work is shared: one upload is one ingest shard's, and on the development VM
//! BLAKE3 and CRC32 over every byte took about 75% of that shard's thread while a single
//! 4 GiB upload ran at ~1 GiB/s, the other shards idle (BENCHMARKS.md §1). BLAKE3 is a
//! tree hash (its paper, §2.1; [`blake3::hazmat`]): the stream splits into units of
//! [`DIGEST_UNIT_BYTES`], each unit's *chaining value* can be computed anywhere, and the
//! key is the tree over them. The chunk CRCs split on the same boundaries.
//!
//! What this module owns: [`StreamDigest`], one upload's digest state; [`UnitHasher`],
//! the work of one unit, done by the ingest shard or by a peer that was sent the unit's
//! bytes ([`super::shard::Request::Digest`]); [`ChunkCrcs`], a CRC table.
//!
//! Guarantees:
//! - the key is exactly `blake3::hash` of the bytes in order, and the CRC table exactly
//!   [`ChunkCrcs`]' of them, whatever the chunking and whichever shard hashed which unit
//!   (tests: every length around unit and chunk boundaries, odd chunkings, peers that
//!   answer late, out of order or never);
//! - a unit goes to a peer only if [`Offload::choose`] gives a peer and a permit; the
//!   shard's implementation offers only peers with no upload of their own, and at most
//!   [`OFFLOAD_UNITS_MAX`] units away per ingest shard, so the bytes held for peers
//!   (shared [`Bytes`], not copies) are bounded per shard;
//! - a unit whose peer cannot take it or never answers (a full inbox, a shard shutting
//!   down) is hashed here, from the bytes kept until its digest is in;
//! - the first unit is always hashed here, so that a blob of at most one unit needs no
//!   tree: its hash is the unit's root hash;
//! - a peer hashes a unit in one go, so its own requests wait at most one unit's
//!   hashing behind it (see [`DIGEST_UNIT_BYTES`]).

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;

use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use bytes::Bytes;
use tokio::sync::oneshot;

use super::format::CHUNK_BYTES;
use super::types::BlobKey;

/// The span of a blob's stream that one shard hashes at a time. A power of two of
/// BLAKE3 chunks (1024 bytes) and a multiple of [`CHUNK_BYTES`], so that every unit is
/// a subtree of BLAKE3's tree and covers whole CRC chunks.
/// 256 KiB: a peer hashes a unit in one go (monoio re-polls a task that wakes itself
/// before any other, so a yield inside it would not let the peer's other requests in),
/// about 0.11 ms on the development VM, which bounds how long those requests wait.
pub const DIGEST_UNIT_BYTES: u64 = 256 << 10;
const _: () = assert!(DIGEST_UNIT_BYTES.is_power_of_two());
const _: () = assert!(DIGEST_UNIT_BYTES >= blake3::CHUNK_LEN as u64);
const _: () = assert!(DIGEST_UNIT_BYTES.is_multiple_of(CHUNK_BYTES));

/// Units an ingest shard may have away at peers (gathered or being hashed) at once:
/// 2 MiB of shared upload bytes.
pub const OFFLOAD_UNITS_MAX: usize = 8;

/// Units kept in stream order behind one whose digest has not come back yet, before
/// the upload waits for it (each is a chaining value and 16 CRCs).
const QUEUED_UNITS_MAX: usize = 64;

/// The CRCs of a stream's 64 KiB chunks, computed as bytes arrive.
#[derive(Default)]
pub struct ChunkCrcs {
    done: Vec<u32>,
    current: crc32fast::Hasher,
    current_bytes: u64,
}

impl ChunkCrcs {
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let take = ((CHUNK_BYTES - self.current_bytes) as usize).min(data.len());
            self.current.update(&data[..take]);
            self.current_bytes += take as u64;
            data = &data[take..];
            if self.current_bytes == CHUNK_BYTES {
                self.done.push(std::mem::take(&mut self.current).finalize());
                self.current_bytes = 0;
            }
        }
    }

    /// One CRC per chunk, the last one of a partial chunk.
    fn words(mut self) -> Vec<u32> {
        if self.current_bytes > 0 {
            self.done.push(self.current.finalize());
        }
        self.done
    }

    /// The table as stored: one little-endian u32 per chunk.
    pub fn finish(self) -> Vec<u8> {
        table_bytes(&self.words())
    }
}

fn table_bytes(crcs: &[u32]) -> Vec<u8> {
    crcs.iter().flat_map(|crc| crc.to_le_bytes()).collect()
}

/// What hashing one unit gives: its chaining value and its chunks' CRCs.
pub struct UnitDigest {
    cv: ChainingValue,
    crcs: Vec<u32>,
}

/// The hash and CRCs of one unit, fed in order.
pub struct UnitHasher {
    hasher: blake3::Hasher,
    crcs: ChunkCrcs,
}

impl UnitHasher {
    /// For the unit that starts at byte `offset` of the stream (a multiple of
    /// [`DIGEST_UNIT_BYTES`]).
    pub fn new(offset: u64) -> UnitHasher {
        debug_assert!(offset.is_multiple_of(DIGEST_UNIT_BYTES));
        let mut hasher = blake3::Hasher::new();
        hasher.set_input_offset(offset);
        UnitHasher {
            hasher,
            crcs: ChunkCrcs::default(),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.crcs.update(data);
    }

    /// The unit as a subtree of a longer stream.
    pub fn finish(self) -> UnitDigest {
        UnitDigest {
            cv: self.hasher.finalize_non_root(),
            crcs: self.crcs.words(),
        }
    }

    /// The first unit as the whole stream: the blob's key and CRCs.
    fn finish_root(self) -> (BlobKey, Vec<u32>) {
        (
            BlobKey(*self.hasher.finalize().as_bytes()),
            self.crcs.words(),
        )
    }

    /// The digest of the unit at `offset` whose bytes are `pieces`: a peer's work, or
    /// this shard's for a unit no peer took.
    pub fn digest(offset: u64, pieces: &[Bytes]) -> UnitDigest {
        let mut unit = UnitHasher::new(offset);
        pieces.iter().for_each(|piece| unit.update(piece));
        unit.finish()
    }
}

/// One unit away at a peer, counted in its ingest shard's count of units away until
/// dropped.
pub struct AwayPermit(Rc<Cell<usize>>);

impl AwayPermit {
    /// A permit, if fewer than [`OFFLOAD_UNITS_MAX`] units are `away`.
    pub fn take(away: &Rc<Cell<usize>>) -> Option<AwayPermit> {
        if away.get() >= OFFLOAD_UNITS_MAX {
            return None;
        }
        away.set(away.get() + 1);
        Some(AwayPermit(away.clone()))
    }
}

impl Drop for AwayPermit {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// Where units may be hashed besides here.
pub trait Offload {
    /// A peer to hash the unit that starts at `offset`, and the permit for it; `None`:
    /// hash it here.
    fn choose(&self, offset: u64) -> Option<(usize, AwayPermit)>;
    /// Sends the unit's bytes to `peer`; `None` if it cannot take them now.
    fn send(
        &self,
        peer: usize,
        offset: u64,
        pieces: Vec<Bytes>,
    ) -> Option<oneshot::Receiver<UnitDigest>>;
}

/// The unit being received.
enum Current {
    /// Hashed here as its bytes arrive (boxed: a hasher is ~2 KiB).
    Here(Box<UnitHasher>),
    /// Gathered (shared `Bytes`) for a peer, which gets it once it is whole.
    Gathering {
        pieces: Vec<Bytes>,
        peer: usize,
        permit: AwayPermit,
    },
}

/// A unit received whole, in stream order.
enum Pending {
    Done(UnitDigest),
    Away {
        offset: u64,
        /// Kept to hash here if the peer never answers.
        pieces: Vec<Bytes>,
        answer: oneshot::Receiver<UnitDigest>,
        _permit: AwayPermit,
    },
}

impl Pending {
    async fn resolve(self) -> UnitDigest {
        match self {
            Pending::Done(digest) => digest,
            Pending::Away {
                offset,
                pieces,
                answer,
                ..
            } => match answer.await {
                Ok(digest) => digest,
                Err(_) => UnitHasher::digest(offset, &pieces),
            },
        }
    }
}

/// The chaining values of whole subtrees along the tree's right edge, BLAKE3's own
/// "CV stack" at unit granularity: before unit `i` is pushed, the stack is merged down
/// to `i.count_ones()` subtrees, so a merge happens only once a later unit exists and
/// is never the root.
#[derive(Default)]
struct Tree {
    stack: Vec<ChainingValue>,
    units: u64,
}

impl Tree {
    fn push(&mut self, cv: ChainingValue) {
        while self.stack.len() > self.units.count_ones() as usize {
            let right = self.stack.pop().expect("two subtrees");
            let left = self.stack.pop().expect("two subtrees");
            self.stack
                .push(merge_subtrees_non_root(&left, &right, Mode::Hash));
        }
        self.stack.push(cv);
        self.units += 1;
    }

    /// The root over every unit pushed; at least two.
    fn root(mut self) -> BlobKey {
        let mut right = self.stack.pop().expect("at least two units");
        loop {
            let left = self.stack.pop().expect("at least two units");
            if self.stack.is_empty() {
                return BlobKey(*merge_subtrees_root(&left, &right, Mode::Hash).as_bytes());
            }
            right = merge_subtrees_non_root(&left, &right, Mode::Hash);
        }
    }
}

/// One upload's digest: feed it the stream's bytes in order ([`StreamDigest::update`]),
/// then take the key and the CRC table ([`StreamDigest::finish`]).
pub struct StreamDigest<O: Offload> {
    offload: O,
    received: u64,
    current: Current,
    /// Units received whole and not yet in `tree`, in stream order.
    queue: VecDeque<Pending>,
    tree: Tree,
    /// CRCs of the units in `tree`.
    crcs: Vec<u32>,
}

impl<O: Offload> StreamDigest<O> {
    pub fn new(offload: O) -> StreamDigest<O> {
        StreamDigest {
            offload,
            received: 0,
            current: Current::Here(Box::new(UnitHasher::new(0))),
            queue: VecDeque::new(),
            tree: Tree::default(),
            crcs: Vec::new(),
        }
    }

    /// Feeds the next bytes of the stream. Waits only if a peer is far behind
    /// ([`QUEUED_UNITS_MAX`]).
    pub async fn update(&mut self, data: &Bytes) {
        let mut at = 0;
        while at < data.len() {
            let in_unit = self.received % DIGEST_UNIT_BYTES;
            if in_unit == 0 && self.received > 0 {
                self.close_unit().await; // more follows: the full unit is no root
            }
            let take = ((DIGEST_UNIT_BYTES - in_unit) as usize).min(data.len() - at);
            match &mut self.current {
                Current::Here(unit) => unit.update(&data[at..at + take]),
                Current::Gathering { pieces, .. } => pieces.push(data.slice(at..at + take)),
            }
            at += take;
            self.received += take as u64;
        }
    }

    /// Closes the current unit, which is whole and not the last, and opens the next.
    async fn close_unit(&mut self) {
        let offset = self.received - DIGEST_UNIT_BYTES;
        let next = match self.offload.choose(self.received) {
            Some((peer, permit)) => Current::Gathering {
                pieces: Vec::new(),
                peer,
                permit,
            },
            None => Current::Here(Box::new(UnitHasher::new(self.received))),
        };
        let pending = match std::mem::replace(&mut self.current, next) {
            Current::Here(unit) => Pending::Done(unit.finish()),
            Current::Gathering {
                pieces,
                peer,
                permit,
            } => match self.offload.send(peer, offset, pieces.clone()) {
                Some(answer) => Pending::Away {
                    offset,
                    pieces,
                    answer,
                    _permit: permit,
                },
                None => Pending::Done(UnitHasher::digest(offset, &pieces)),
            },
        };
        self.queue.push_back(pending);
        self.fold().await;
    }

    /// Moves the digests at the front of the queue that are in into the tree.
    async fn fold(&mut self) {
        while let Some(front) = self.queue.front_mut() {
            if let Pending::Away {
                offset,
                pieces,
                answer,
                ..
            } = front
            {
                match answer.try_recv() {
                    Ok(digest) => *front = Pending::Done(digest),
                    Err(oneshot::error::TryRecvError::Closed) => {
                        *front = Pending::Done(UnitHasher::digest(*offset, pieces));
                    }
                    // Too much queued behind it: `resolve` waits for the answer.
                    Err(oneshot::error::TryRecvError::Empty)
                        if self.queue.len() > QUEUED_UNITS_MAX => {}
                    Err(oneshot::error::TryRecvError::Empty) => return,
                }
            }
            let digest = self.queue.pop_front().expect("a front").resolve().await;
            self.add(digest);
        }
    }

    fn add(&mut self, digest: UnitDigest) {
        self.tree.push(digest.cv);
        self.crcs.extend_from_slice(&digest.crcs);
    }

    /// Bytes fed so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The blob's key and its CRC table as stored (one little-endian u32 per chunk),
    /// once every unit's digest is in.
    pub async fn finish(mut self) -> (BlobKey, Vec<u8>) {
        if self.received <= DIGEST_UNIT_BYTES {
            let Current::Here(unit) = self.current else {
                unreachable!("the first unit is hashed here");
            };
            let (key, crcs) = unit.finish_root();
            return (key, table_bytes(&crcs));
        }
        let offset = (self.received - 1) / DIGEST_UNIT_BYTES * DIGEST_UNIT_BYTES;
        let current = std::mem::replace(
            &mut self.current,
            Current::Here(Box::new(UnitHasher::new(0))),
        );
        let last = match current {
            Current::Here(unit) => unit.finish(),
            Current::Gathering { pieces, .. } => UnitHasher::digest(offset, &pieces),
        };
        self.queue.push_back(Pending::Done(last));
        while let Some(pending) = self.queue.pop_front() {
            let digest = pending.resolve().await;
            self.add(digest);
        }
        let crcs = table_bytes(&self.crcs);
        (self.tree.root(), crcs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A test peer: takes every `every`-th unit (never when `refuse`), answers after
    /// `delay` more units were offered, in reverse order of arrival when it answers
    /// several at once, or drops the unit when `drop_every` says so.
    struct FakePeers {
        every: u64,
        refuse: bool,
        delay: usize,
        drop_every: u64,
        away: Rc<Cell<usize>>,
        waiting: RefCell<Vec<Held>>,
        sent: Cell<usize>,
    }

    /// A unit a fake peer holds: its offset, its bytes, where its digest goes.
    type Held = (u64, Vec<Bytes>, oneshot::Sender<UnitDigest>);

    impl FakePeers {
        fn new(every: u64, delay: usize) -> FakePeers {
            FakePeers {
                every,
                refuse: false,
                delay,
                drop_every: 0,
                away: Rc::default(),
                waiting: RefCell::default(),
                sent: Cell::new(0),
            }
        }

        fn answer_all(&self) {
            let waiting = std::mem::take(&mut *self.waiting.borrow_mut());
            for (offset, pieces, reply) in waiting.into_iter().rev() {
                let unit = offset / DIGEST_UNIT_BYTES;
                if self.drop_every > 0 && unit.is_multiple_of(self.drop_every) {
                    drop(reply); // a peer that went away
                } else {
                    let _ = reply.send(UnitHasher::digest(offset, &pieces));
                }
            }
        }
    }

    impl Offload for &FakePeers {
        fn choose(&self, offset: u64) -> Option<(usize, AwayPermit)> {
            let unit = offset / DIGEST_UNIT_BYTES;
            if self.every == 0 || !unit.is_multiple_of(self.every) {
                return None;
            }
            Some((1, AwayPermit::take(&self.away)?))
        }

        fn send(
            &self,
            peer: usize,
            offset: u64,
            pieces: Vec<Bytes>,
        ) -> Option<oneshot::Receiver<UnitDigest>> {
            assert_eq!(peer, 1);
            if self.refuse {
                return None;
            }
            let (reply, answer) = oneshot::channel();
            self.waiting.borrow_mut().push((offset, pieces, reply));
            self.sent.set(self.sent.get() + 1);
            if self.waiting.borrow().len() > self.delay {
                self.answer_all();
            }
            Some(answer)
        }
    }

    fn content(len: usize, seed: u64) -> Bytes {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect::<Vec<u8>>()
            .into()
    }

    fn expected(data: &[u8]) -> (BlobKey, Vec<u8>) {
        let mut crcs = ChunkCrcs::default();
        crcs.update(data);
        (BlobKey(*blake3::hash(data).as_bytes()), crcs.finish())
    }

    fn digest(data: &Bytes, chunk: usize, peers: &FakePeers) -> (BlobKey, Vec<u8>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let mut digest = StreamDigest::new(peers);
            for piece in data.chunks(chunk.max(1)) {
                drive(digest.update(&data.slice_ref(piece)), peers).await;
            }
            assert_eq!(digest.received(), data.len() as u64);
            drive(digest.finish(), peers).await
        })
    }

    /// Runs `future`; whenever it waits, the peers answer what they hold (a peer with
    /// `delay` `usize::MAX` answers only then).
    async fn drive<F: std::future::Future>(future: F, peers: &FakePeers) -> F::Output {
        let mut future = std::pin::pin!(future);
        for _ in 0..1000 {
            let poll = std::future::poll_fn(|cx| std::task::Poll::Ready(future.as_mut().poll(cx)));
            if let std::task::Poll::Ready(done) = poll.await {
                return done;
            }
            peers.answer_all();
        }
        panic!("the digest waits for nothing any peer holds");
    }

    const UNIT: usize = DIGEST_UNIT_BYTES as usize;
    const CHUNK: usize = CHUNK_BYTES as usize;

    fn lengths() -> Vec<usize> {
        let mut lengths = vec![0, 1, 1023, 1024, 1025, CHUNK - 1, CHUNK, CHUNK + 1];
        for units in [1, 2, 3, 4, 5, 8, 9] {
            for delta in [-(CHUNK as isize) - 1, -1, 0, 1, CHUNK as isize + 7] {
                lengths.push((units * UNIT).checked_add_signed(delta).expect("positive"));
            }
        }
        lengths.push(16 * UNIT + 3 * CHUNK + 11);
        lengths
    }

    #[test]
    fn the_key_and_crcs_match_blake3_and_the_chunk_table_for_any_split_of_the_work() {
        let shapes: Vec<(&str, FakePeers)> = vec![
            ("all here", FakePeers::new(0, 0)),
            ("every unit away, answered at once", FakePeers::new(1, 0)),
            ("every other unit away, answered late", FakePeers::new(2, 3)),
            (
                "every unit away, answered only when waited for",
                FakePeers::new(1, usize::MAX),
            ),
            ("peers that cannot take the unit", {
                let mut peers = FakePeers::new(1, 0);
                peers.refuse = true;
                peers
            }),
            ("peers that drop every third unit", {
                let mut peers = FakePeers::new(1, 2);
                peers.drop_every = 3;
                peers
            }),
        ];
        for len in lengths() {
            let data = content(len, len as u64);
            let want = expected(&data);
            for (name, peers) in &shapes {
                for chunk in [len.max(1), 4096 + 3, 300_000] {
                    let got = digest(&data, chunk, peers);
                    assert!(
                        got == want,
                        "{len} bytes in chunks of {chunk}, {name}: wrong key or CRCs"
                    );
                    assert_eq!(peers.away.get(), 0, "every permit is given back");
                }
            }
        }
        let (_, away) = &shapes[1];
        assert!(away.sent.get() > 100, "units were hashed away");
    }

    /// A peer far behind: units hashed here queue up behind its unit, until the upload
    /// waits for it.
    #[test]
    fn a_peer_far_behind_is_waited_for() {
        let peers = FakePeers::new(QUEUED_UNITS_MAX as u64 + 2, usize::MAX);
        let data = content((2 * QUEUED_UNITS_MAX + 8) * UNIT + 1, 11);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let got = runtime.block_on(async {
            let mut digest = StreamDigest::new(&peers);
            for piece in data.chunks(UNIT / 2) {
                drive(digest.update(&data.slice_ref(piece)), &peers).await;
                assert!(
                    digest.queue.len() <= QUEUED_UNITS_MAX + 1,
                    "the queue is bounded"
                );
            }
            drive(digest.finish(), &peers).await
        });
        assert_eq!(got, expected(&data));
        assert!(peers.sent.get() >= 2, "units went away");
    }

    #[test]
    fn units_away_are_bounded_by_the_permits() {
        let peers = FakePeers::new(1, usize::MAX); // answers only when waited for
        let data = content(3 * OFFLOAD_UNITS_MAX * UNIT + 5, 9);
        assert_eq!(digest(&data, 65_536, &peers), expected(&data));
        assert_eq!(
            peers.sent.get(),
            OFFLOAD_UNITS_MAX,
            "no more units away than permits, the rest hashed here"
        );
    }
}
