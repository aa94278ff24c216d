//! What the clients of a SIGKILL test were told, kept across rounds of kill and
//! restart, and the check of a restarted store against it. Shared by the engine's
//! (`crash_sigkill.rs`) and the server's (`server_sigkill.rs`) tests.

use std::collections::{BTreeMap, BTreeSet};

use graviton::engine::BlobKey;
use graviton_io::sim::SimRng;

/// An upload's identity: (round, worker, sequence).
pub type Id = (u64, u64, u64);

/// The content of upload `id`, derived from it by a seeded generator so that the
/// checker can regenerate what any client sent. Never empty: distinct uploads must not
/// share a key.
pub fn content((round, worker, sequence): Id) -> Vec<u8> {
    let mut rng = SimRng::new(round << 40 ^ worker << 32 ^ sequence);
    let size = match rng.below(4) {
        0 => rng.below(5000) + 1,
        1 | 2 => rng.below(300_000) + 1,
        _ => rng.below(3 << 20) + 1,
    };
    let mut bytes = vec![0u8; size as usize];
    rng.fill(&mut bytes);
    bytes
}

/// What the clients were told.
#[derive(Default)]
pub struct Told {
    /// Acknowledged and not deleted since.
    present: BTreeMap<BlobKey, Id>,
    /// Acknowledged deleted.
    deleted: BTreeSet<BlobKey>,
    /// Deletes sent but not answered: either outcome is right.
    maybe_deleted: BTreeSet<BlobKey>,
    /// Uploads started but not acknowledged.
    in_flight: BTreeSet<Id>,
    /// Uploads acknowledged, over every round.
    acknowledged: u64,
}

impl Told {
    pub fn uploading(&mut self, id: Id) {
        self.in_flight.insert(id);
    }

    pub fn uploaded(&mut self, id: Id, key: BlobKey) {
        self.in_flight.remove(&id);
        self.present.insert(key, id);
        self.acknowledged += 1;
    }

    pub fn deleting(&mut self, key: BlobKey) {
        self.maybe_deleted.insert(key);
    }

    pub fn deleted(&mut self, key: BlobKey) {
        self.maybe_deleted.remove(&key);
        self.present.remove(&key);
        self.deleted.insert(key);
    }

    /// What the test did, for its output, after checking that it did something:
    /// a run in which nothing was acknowledged tested nothing.
    pub fn summary(&self) -> String {
        assert!(
            self.acknowledged > 0,
            "nothing was acknowledged: the test tested nothing"
        );
        format!(
            "{} uploads acknowledged; {} blobs stored, {} deleted",
            self.acknowledged,
            self.present.len(),
            self.deleted.len()
        )
    }

    /// Checks a restarted store, which `listed` every key of and whose blobs `read`
    /// returns whole, against what the clients were told:
    /// - every acknowledged blob is there, byte for byte;
    /// - no acknowledged delete is undone;
    /// - nothing else is visible but uploads in flight at the kill, exact.
    ///
    /// Then settles what was in doubt as the store now says, for the next round.
    pub async fn check(
        &mut self,
        round: u64,
        listed: &BTreeSet<BlobKey>,
        mut read: impl AsyncFnMut(&BlobKey) -> Vec<u8>,
    ) {
        for (key, &id) in &self.present {
            if self.maybe_deleted.contains(key) {
                continue;
            }
            assert!(
                listed.contains(key),
                "round {round}: acknowledged blob {key} {id:?} lost"
            );
            assert!(
                read(key).await == content(id),
                "round {round}: blob {key} has other bytes"
            );
        }
        let possible: BTreeMap<BlobKey, Id> = self
            .in_flight
            .iter()
            .map(|&id| (BlobKey::of(&content(id)), id))
            .collect();
        for key in listed {
            if self.present.contains_key(key) || self.maybe_deleted.contains(key) {
                continue;
            }
            assert!(
                !self.deleted.contains(key),
                "round {round}: deleted blob {key} came back"
            );
            let Some(&id) = possible.get(key) else {
                panic!("round {round}: blob {key} is visible but no upload of it was in flight");
            };
            assert!(
                read(key).await == content(id),
                "round {round}: in-flight blob {key} has other bytes"
            );
            self.present.insert(*key, id); // it survived: from now on it must stay
        }
        for key in std::mem::take(&mut self.maybe_deleted) {
            if listed.contains(&key) {
                self.deleted.remove(&key);
            } else {
                self.present.remove(&key);
                self.deleted.insert(key);
            }
        }
        self.in_flight.clear();
    }
}
