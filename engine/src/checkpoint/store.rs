//! What checkpoints need of the lake: object storage with a conditional create, and a fence.

use async_trait::async_trait;
use bytes::Bytes;

use super::StagedFile;
use crate::error::Result;
use crate::message::BadRecord;

/// Object storage as checkpoints need it (the lake implements it). Paths are relative to
/// the lake's root, `/`-separated.
#[async_trait]
pub trait CheckpointStore: Send + Sync + std::fmt::Debug {
    /// Writes an object whole (atomically: readers see all of it or nothing).
    async fn put(&self, path: &str, bytes: Bytes) -> Result<()>;
    /// Writes an object only if there is none at `path` (a conditional create); returns
    /// whether it wrote it.
    async fn put_new(&self, path: &str, bytes: Bytes) -> Result<bool>;
    /// Reads an object; `None` if it does not exist.
    async fn get(&self, path: &str) -> Result<Option<Bytes>>;
    /// Every object under `prefix`, recursively.
    async fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Deletes an object; deleting one that does not exist is not an error.
    async fn delete(&self, path: &str) -> Result<()>;
    /// Deletes objects, in as few requests as the store allows (S3: `DeleteObjects`, 1000
    /// keys a request); deleting one that does not exist is not an error.
    async fn delete_all(&self, paths: &[String]) -> Result<()> {
        for p in paths {
            self.delete(p).await?;
        }
        Ok(())
    }
    /// Moves `file.staged` to `file.target`. Idempotent: when the staged file is gone and
    /// the target exists, the move already happened.
    async fn publish(&self, file: &super::StagedFile) -> Result<()>;
    /// Stages `records` as the errors-zone file `file` of `name`, in the partition of
    /// `at_micros` (published with the epoch; the same arguments give the same file).
    async fn stage_errors(
        &self,
        name: &str,
        records: &[BadRecord],
        at_micros: i64,
        file: &str,
    ) -> Result<StagedFile>;
}

/// Whether this process may still commit to the lake: it holds the lake's writer lease.
pub trait Fence: Send + Sync + std::fmt::Debug {
    /// `Err(EngineError::Fenced)` once the lease may have passed to another process.
    fn check(&self) -> Result<()>;
}

/// The fence of a process that is the lake's only writer by construction (tests, tools).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFence;

impl Fence for NoFence {
    fn check(&self) -> Result<()> {
        Ok(())
    }
}
