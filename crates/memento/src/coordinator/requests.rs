//! Triggered snapshots and their outcomes, by request id: what the REST
//! APIs answer when a client polls a trigger (`GET …/savepoints/{request}`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::control::TriggerResult;

/// Status of a triggered snapshot, as `GET …/savepoints/{request}` returns it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RequestStatus {
    /// Triggered, not complete yet.
    InProgress,
    /// Complete: the snapshot's id.
    Completed {
        /// The snapshot id.
        snapshot: String,
    },
    /// Failed: why.
    Failed {
        /// The reason.
        error: String,
    },
}

/// The triggers of one job and their outcomes, by request id.
#[derive(Default)]
pub struct RequestLog {
    next: std::sync::atomic::AtomicU64,
    /// Status by request id, and whether a client has read it since it
    /// was resolved.
    map: Arc<Mutex<HashMap<u64, (RequestStatus, bool)>>>,
}

impl RequestLog {
    /// Record a trigger and follow its outcome on a short-lived thread;
    /// returns its request id.
    pub fn track(&self, rx: crossbeam_channel::Receiver<TriggerResult>) -> u64 {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        self.map
            .lock()
            .unwrap()
            .insert(id, (RequestStatus::InProgress, false));
        let map = self.map.clone();
        std::thread::spawn(move || {
            let status = match rx.recv() {
                Ok(Ok(snapshot)) => RequestStatus::Completed {
                    snapshot: snapshot.to_string(),
                },
                Ok(Err(error)) => RequestStatus::Failed {
                    error: error.to_string(),
                },
                Err(_) => RequestStatus::Failed {
                    error: "the job ended".into(),
                },
            };
            map.lock().unwrap().insert(id, (status, false));
        });
        id
    }

    /// The status of request `id`, if there is one.
    pub fn get(&self, id: u64) -> Option<RequestStatus> {
        let mut map = self.map.lock().unwrap();
        let (status, read) = map.get_mut(&id)?;
        *read = !matches!(status, RequestStatus::InProgress);
        Some(status.clone())
    }

    /// Whether some request's outcome has not been read by a client yet.
    pub fn unread(&self) -> bool {
        self.map.lock().unwrap().values().any(|(_, read)| !read)
    }
}
