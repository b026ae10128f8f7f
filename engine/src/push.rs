//! Push sources: sources that the server's front doors feed (one request body at a time)
//! instead of a reader pulling records. The server hands a request to the source by name
//! through [`PushSource`] and answers with what it returns; it knows no connector.

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::checkpoint::ReaderCheckpoint;
use crate::error::{EngineError, Result};

/// One record of a request that was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedLine {
    /// 1-based line number (NDJSON) or element position (JSON array).
    pub line: usize,
    /// Why it was rejected.
    pub reason: String,
}

/// What happened to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestReport {
    /// Records accepted and published.
    pub accepted: usize,
    /// Records rejected, in input order.
    pub rejected: Vec<RejectedLine>,
}

/// Why a whole request failed.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The body cannot be split into records (the client's fault). It was stored in the
    /// errors zone whole.
    #[error("{0}")]
    Malformed(String),
    /// The lake could not store the body (retrying may help); nothing was published.
    #[error("cannot store the request: {0}")]
    Storage(EngineError),
    /// The idempotency key is empty or too long.
    #[error("{0}")]
    BadKey(String),
}

impl From<EngineError> for IngestError {
    fn from(e: EngineError) -> Self {
        Self::Storage(e)
    }
}

/// The receiving end of a push source.
#[async_trait]
pub trait PushSource: Send + Sync + std::fmt::Debug {
    /// The largest body it accepts, in bytes.
    fn max_request_size(&self) -> u64;

    /// Stores, validates and publishes one request body; returns once the accepted records
    /// are published (and durable where the source says so). `origin` describes the request
    /// in errors-zone records; `key` is its idempotency key, if it has one (a retry with the
    /// same key gets the first answer again).
    async fn ingest(
        &self,
        body: Bytes,
        origin: &str,
        key: Option<&str>,
    ) -> std::result::Result<IngestReport, IngestError>;

    /// Takes part in checkpoints: sends each requested barrier between two requests, with
    /// the position covering every request published before it. Runs until the source stops.
    fn checkpoint(self: std::sync::Arc<Self>, checkpoint: ReaderCheckpoint);

    /// Publishes again what was stored after `position` (from the last checkpoint), before
    /// the source takes requests; returns the records replayed.
    async fn replay(&self, position: &serde_json::Value) -> Result<usize>;
}
