//! `Idempotency-Key`: a request retried with the same key is answered as the first time and
//! its body stored once.
//!
//! Each key gets a marker object, `_sluice/idempotency/<source>/<key as hex>.json`, written
//! *before* the body is stored (`{"seq": n, "at": µs}`: the number the body is stored under)
//! and completed with the answer once the request is done. A retry then finds:
//! - a completed marker: the first answer, sent again;
//! - a marker without an answer (the first attempt stopped half way, a crash say) whose body
//!   is in the raw zone: that body's answer, worked out again from it. If the body was
//!   stored before this server started, the start replayed it to the streams already;
//!   otherwise this server failed after storing it, and the retry finishes the job
//!   (errors zone, streams) without storing it again;
//! - a marker whose body was never stored, or none: a new request.
//!
//! Markers older than the source's `idempotency_window` (default 24 hours, as Stripe keeps
//! keys) no longer count and are deleted by a sweep. Keys are at most 255 bytes.

use object_store::path::Path;
use serde::{Deserialize, Serialize};

use super::IngestReport;
use crate::error::Result;
use crate::lake::{Lake, Zone};

/// The longest key taken, in bytes.
pub const MAX_KEY_BYTES: usize = 255;

/// One key's marker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Marker {
    /// The number the body is stored under.
    pub seq: u64,
    /// When the first attempt began, µs since the epoch.
    pub at: i64,
    /// The answer, once the first attempt finished.
    pub outcome: Option<Outcome>,
}

/// What the first attempt answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) enum Outcome {
    /// Stored and published (some records may have been rejected).
    Ingested(IngestReport),
    /// The body could not be split into records.
    Malformed(String),
}

/// The markers of one source.
#[derive(Debug, Clone)]
pub(super) struct Markers {
    lake: Lake,
    dir: Path,
    /// How long a key counts, µs.
    window_micros: i64,
}

impl Markers {
    pub(super) fn new(lake: Lake, source: &str, window: std::time::Duration) -> Self {
        Self {
            dir: lake.dir(Zone::Internal, "idempotency").join(source),
            lake,
            window_micros: window.as_micros().min(i64::MAX as u128) as i64,
        }
    }

    fn path(&self, key: &str) -> Path {
        let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
        self.dir.clone().join(format!("{hex}.json"))
    }

    /// The marker of `key`, unless there is none or it is older than the window.
    pub(super) async fn get(&self, key: &str, now: i64) -> Result<Option<Marker>> {
        let Some(bytes) = self.lake.get_opt(&self.path(key)).await? else {
            return Ok(None);
        };
        // A marker that does not parse (a torn write cannot happen: puts are atomic) is
        // treated as absent.
        Ok(serde_json::from_slice::<Marker>(&bytes)
            .ok()
            .filter(|m| now - m.at <= self.window_micros))
    }

    /// Writes `key`'s marker.
    pub(super) async fn put(&self, key: &str, marker: &Marker) -> Result<()> {
        let bytes = serde_json::to_vec(marker).expect("a marker serialises");
        self.lake.put(&self.path(key), bytes).await
    }

    /// Deletes the markers older than the window; how many.
    pub(super) async fn sweep(&self, now: i64) -> Result<usize> {
        let mut deleted = 0;
        for path in self.lake.list(&self.dir).await? {
            let Some(bytes) = self.lake.get_opt(&path).await? else {
                continue;
            };
            let expired = serde_json::from_slice::<Marker>(&bytes)
                .map(|m| now - m.at > self.window_micros)
                .unwrap_or(true);
            if expired {
                self.lake.delete(&path).await?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}
