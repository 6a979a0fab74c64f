//! Canonical state read back from the store piece by piece, for
//! `restore-state`: chunks are read (verified) one at a time as the
//! operator asks for more, so a restore holds at most a chunk and a piece.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use crate::runtime::{MAX_PIECE, Piece, StateSource};
use crate::store::{ChunkRef, SnapshotId, StoreError, TaskKey, TenantStore};

use super::framing::Deframer;

/// The pieces of one task's canonical state in a snapshot.
pub(super) struct StoreSource {
    store: TenantStore,
    id: SnapshotId,
    task: TaskKey,
    chunks: Vec<ChunkRef>,
    next: usize,
    /// `false` for a snapshot from before framing: its bytes are the
    /// operator's, handed back as unkeyed pieces.
    framed: bool,
    deframer: Deframer,
    /// Legacy bytes cut into pieces, not yet read.
    pending: VecDeque<Piece>,
    /// The key groups the restoring task owns: pieces of others are not
    /// its state.
    owned: Range<u32>,
    /// A store error, kept whole for the caller (the runtime only carries
    /// its message).
    failure: Arc<Mutex<Option<StoreError>>>,
}

impl StoreSource {
    pub(super) fn new(
        store: TenantStore,
        id: SnapshotId,
        task: TaskKey,
        chunks: Vec<ChunkRef>,
        framed: bool,
        owned: Range<u32>,
    ) -> (StoreSource, Arc<Mutex<Option<StoreError>>>) {
        let failure = Arc::new(Mutex::new(None));
        let source = StoreSource {
            store,
            id,
            task,
            chunks,
            next: 0,
            framed,
            deframer: Deframer::default(),
            pending: VecDeque::new(),
            owned,
            failure: failure.clone(),
        };
        (source, failure)
    }

    /// The next chunk's bytes, or `None` after the last.
    fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
        let Some(chunk) = self.chunks.get(self.next) else {
            return Ok(None);
        };
        self.next += 1;
        match self
            .store
            .read_chunks(&self.id, &self.task, std::slice::from_ref(chunk))
        {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) => {
                let message = e.to_string();
                *self.failure.lock().expect("not poisoned") = Some(e);
                Err(message)
            }
        }
    }
}

impl StateSource for StoreSource {
    fn read(&mut self) -> Result<Option<Piece>, String> {
        if !self.framed {
            loop {
                if let Some(piece) = self.pending.pop_front() {
                    return Ok(Some(piece));
                }
                let Some(bytes) = self.next_chunk()? else {
                    return Ok(None);
                };
                self.pending
                    .extend(bytes.chunks(MAX_PIECE).map(|p| (None, p.to_vec())));
            }
        }
        loop {
            let parsed = self
                .deframer
                .next_piece()
                .map_err(|e| format!("snapshot {}, task {}: {e}", self.id, self.task))?;
            match parsed {
                Some((Some(g), _)) if !self.owned.contains(&g) => continue,
                Some(piece) => return Ok(Some(piece)),
                None => match self.next_chunk()? {
                    Some(bytes) => self.deframer.feed(&bytes),
                    None => {
                        self.deframer
                            .finish()
                            .map_err(|e| format!("snapshot {}, task {}: {e}", self.id, self.task))?;
                        return Ok(None);
                    }
                },
            }
        }
    }
}
