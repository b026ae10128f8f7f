//! A committed checkpoint on storage: `_sluice/checkpoints/<epoch>/manifest.json` and the
//! Arrow IPC state files it names.

use std::collections::{BTreeMap, BTreeSet};

use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{CHECKPOINTS_DIR, CheckpointStore, StagedFile};
use crate::error::{EngineError, Result};

/// The manifest format this build writes; it reads this one and every older one.
pub const MANIFEST_VERSION: u32 = 1;

/// The state version of operator states stored before versions were recorded.
fn first_state_version() -> u32 {
    1
}

/// What the manifest holds of one operator's state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoredState {
    /// The operator's name.
    pub operator: String,
    /// Its state layout's version ([`super::OperatorState::version`]; checkpoints written
    /// before versions were recorded hold version 1).
    #[serde(default = "first_state_version")]
    pub version: u32,
    /// Its scalars.
    pub values: BTreeMap<String, i64>,
    /// Its tables: name → IPC file path.
    pub tables: BTreeMap<String, String>,
}

/// What the manifest holds of one stream.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamCheckpoint {
    /// The `CREATE STREAM` statement: state is only restored into the same query.
    pub sql: String,
    /// Subtasks of the stateful chain when the state was taken.
    pub parallelism: usize,
    /// Readers' positions, by source name.
    pub positions: BTreeMap<String, serde_json::Value>,
    /// Per subtask, per operator of its chain: the state (`None`: stateless).
    pub subtasks: Vec<Vec<Option<StoredState>>>,
    /// Files this epoch made visible (phase two; redone on recovery if interrupted).
    pub staged: Vec<StagedFile>,
    /// The stream's counters at the barrier (absent in checkpoints of older versions).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counters: BTreeMap<String, i64>,
}

/// `_sluice/checkpoints/<epoch>/manifest.json`: one complete checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Manifest {
    /// The format version.
    pub version: u32,
    /// The epoch.
    pub epoch: u64,
    /// When it completed (µs since the epoch).
    pub completed_at_micros: i64,
    /// Every checkpointed stream.
    pub streams: BTreeMap<String, StreamCheckpoint>,
    /// The coordinator that wrote it (an id per process start), so that a retried commit
    /// knows its own manifest from another writer's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub writer: String,
}

/// What [`manifests`] found.
#[derive(Debug, Default)]
pub struct Manifests {
    /// The newest readable manifest.
    pub newest: Option<Manifest>,
    /// Manifests newer than it that could not be read: (path, why).
    pub unreadable: Vec<(String, String)>,
    /// The highest epoch with a manifest, readable or not.
    pub highest_epoch: u64,
}

/// The epoch of a `…/<epoch>/manifest.json` path.
pub(super) fn epoch_of(path: &str) -> Option<u64> {
    path.strip_suffix("/manifest.json")?
        .rsplit('/')
        .next()?
        .parse()
        .ok()
}

/// The manifests in `store`: the newest that reads, and the newer ones that do not. A
/// manifest written by a newer Sluice is an error, not skipped (this build must not
/// overwrite what it cannot read).
pub async fn manifests(store: &dyn CheckpointStore) -> Result<Manifests> {
    let mut paths: Vec<(u64, String)> = store
        .list(CHECKPOINTS_DIR)
        .await?
        .into_iter()
        .filter_map(|p| Some((epoch_of(&p)?, p)))
        .collect();
    paths.sort();
    let mut found = Manifests {
        highest_epoch: paths.last().map_or(0, |(e, _)| *e),
        ..Default::default()
    };
    while let Some((_, path)) = paths.pop() {
        let Some(bytes) = store.get(&path).await? else {
            continue; // deleted meanwhile (retention)
        };
        let m: Manifest = match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => {
                found.unreadable.push((path, e.to_string()));
                continue;
            }
        };
        if m.version > MANIFEST_VERSION {
            return Err(EngineError::Checkpoint(format!(
                "{path} has format version {}, written by a newer Sluice (this one reads up to {MANIFEST_VERSION})",
                m.version
            )));
        }
        found.newest = Some(m);
        break;
    }
    Ok(found)
}

/// The newest readable manifest in `store`, if any.
pub async fn latest_manifest(store: &dyn CheckpointStore) -> Result<Option<Manifest>> {
    Ok(manifests(store).await?.newest)
}

/// The state files `m` names.
pub(super) fn state_files(m: &Manifest) -> BTreeSet<String> {
    m.streams
        .values()
        .flat_map(|s| s.subtasks.iter().flatten().flatten())
        .flat_map(|s| s.tables.values().cloned())
        .collect()
}

/// One batch as an Arrow IPC file.
pub fn write_ipc(batch: &RecordBatch) -> Result<Bytes> {
    let mut buf = Vec::new();
    let mut w = arrow::ipc::writer::FileWriter::try_new(&mut buf, &batch.schema())?;
    w.write(batch)?;
    w.finish()?;
    drop(w);
    Ok(Bytes::from(buf))
}

/// The batches of an Arrow IPC file, concatenated.
pub fn read_ipc(bytes: &Bytes, path: &str) -> Result<RecordBatch> {
    let reader = arrow::ipc::reader::FileReader::try_new(std::io::Cursor::new(bytes.clone()), None)
        .map_err(|e| EngineError::Checkpoint(format!("{path}: {e}")))?;
    let schema = reader.schema();
    let batches = reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| EngineError::Checkpoint(format!("{path}: {e}")))?;
    Ok(arrow::compute::concat_batches(&schema, &batches)?)
}
