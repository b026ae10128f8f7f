//! The lake: one object-store root holding every zone, on a local directory or on S3.
//!
//! ```text
//! <lake>/raw/<source>/dt=YYYY-MM-DD/hour=HH/…        payloads as received (arrival time)
//! <lake>/errors/<name>/dt=YYYY-MM-DD/hour=HH/…       rejected records, JSON lines (arrival time)
//! <lake>/processed/<stream>/dt=YYYY-MM-DD/hour=HH/…  stream output, Parquet (event time)
//! <lake>/_sluice/…                                   catalog and internal state
//! ```
//!
//! Both back ends go through the same `object_store` code path; a file becomes visible
//! only once complete (a single PUT, or a completed multipart upload, which the local back
//! end implements as write-to-staging-file + rename).

mod athena;
mod compaction;
#[cfg(feature = "aws")]
mod glue;
#[cfg(not(feature = "aws"))]
mod no_glue;
mod parquet_writer;
mod records;

pub use athena::{ATHENA_DDL_FILE, athena_ddl, write_athena_ddl};
pub use compaction::{
    COMPACTION_STAGING, Compacted, MARKER_FILE, PartitionCompactor, PartitionMarker, is_data_file,
};
#[cfg(feature = "aws")]
pub use glue::GlueCatalog;
#[cfg(not(feature = "aws"))]
pub use no_glue::GlueCatalog;
pub use parquet_writer::{CompactionCounts, OnFinal, ParquetLakeWriter, lake_schema};
pub use records::{RecordZone, run_errors_writer};

use std::sync::Arc;

use chrono::{DateTime, Datelike, Timelike};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use url::Url;

use crate::error::{ConnectorError, Result};

/// Microseconds in one hour: the partition granularity.
pub const MICROS_PER_HOUR: i64 = 3_600_000_000;

/// The zones of the lake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Zone {
    /// Payloads as received, per source.
    Raw,
    /// Rejected records with their reasons, per source or stream.
    Errors,
    /// Stream output as Parquet, per stream.
    Processed,
    /// Sluice's own files (catalog, checkpoints).
    Internal,
}

impl Zone {
    /// The zone's top-level folder.
    pub fn dir(self) -> &'static str {
        match self {
            Zone::Raw => "raw",
            Zone::Errors => "errors",
            Zone::Processed => "processed",
            Zone::Internal => "_sluice",
        }
    }
}

/// An opened lake.
#[derive(Debug, Clone)]
pub struct Lake {
    store: Arc<dyn ObjectStore>,
    /// Path of the lake root inside `store`.
    root: Path,
    /// URL of `store`'s root (`file:///` or `s3://bucket/`), as DataFusion registers stores.
    store_url: Url,
    /// The location as the user gave it, normalised, for messages.
    location: String,
    /// The root directory of a local lake (folders there outlive the files moved out of
    /// them: [`Lake::remove_dir`] removes them too).
    local_root: Option<std::path::PathBuf>,
    /// What was committed to it, shared by every clone.
    stats: Arc<LakeStats>,
}

/// What a lake's clones committed: files and bytes per zone and name, how long rows took
/// from reaching a writer to being in a committed processed file, and the earliest `dt`
/// partition each stream committed a processed file to.
#[derive(Debug, Default)]
pub struct LakeStats {
    committed: std::sync::Mutex<std::collections::BTreeMap<(Zone, String), (u64, u64)>>,
    latencies: std::sync::Mutex<std::collections::VecDeque<std::time::Duration>>,
    first_days: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

/// How many latencies [`LakeStats::take_latencies`] keeps between calls.
const MAX_PENDING_LATENCIES: usize = 4096;

impl LakeStats {
    /// Files and bytes committed so far, per (zone, name): raw, errors and processed files.
    pub fn committed(&self) -> Vec<(Zone, String, u64, u64)> {
        lock(&self.committed)
            .iter()
            .map(|((z, n), (files, bytes))| (*z, n.clone(), *files, *bytes))
            .collect()
    }

    /// Starts counting `name` in `zone` at zero (so its series exist before its first file).
    pub fn register(&self, zone: Zone, name: &str) {
        lock(&self.committed)
            .entry((zone, name.to_string()))
            .or_default();
    }

    /// The earliest `dt` (`YYYY-MM-DD`) of a processed file of `stream` this process
    /// committed, if any (see [`Lake::first_partition_day`] for what the lake holds).
    pub fn first_day(&self, stream: &str) -> Option<String> {
        lock(&self.first_days).get(stream).cloned()
    }

    fn note_day(&self, stream: &str, day: &str) {
        let mut days = lock(&self.first_days);
        match days.get_mut(stream) {
            Some(d) if d.as_str() <= day => {}
            Some(d) => *d = day.to_string(),
            None => {
                days.insert(stream.to_string(), day.to_string());
            }
        }
    }

    /// For each processed file committed since the last call, how long after its first row
    /// reached the writer it was committed (at most the last 4096).
    pub fn take_latencies(&self) -> Vec<std::time::Duration> {
        lock(&self.latencies).drain(..).collect()
    }

    fn record(&self, zone: Zone, name: &str, bytes: u64, first_row_at: Option<i64>) {
        let mut c = lock(&self.committed);
        let e = c.entry((zone, name.to_string())).or_default();
        e.0 += 1;
        e.1 += bytes;
        drop(c);
        if let Some(t) = first_row_at {
            let micros = (sluice_engine::EventTime::now().micros() - t).max(0);
            let mut l = lock(&self.latencies);
            if l.len() >= MAX_PENDING_LATENCIES {
                l.pop_front();
            }
            l.push_back(std::time::Duration::from_micros(micros as u64));
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Lake {
    /// Opens the lake at `location`: a local path (created if missing), a `file://` URL, or
    /// `s3://bucket[/prefix]` (credentials, region and endpoint from the standard AWS
    /// environment variables; `AWS_ENDPOINT_URL` selects an S3-compatible server).
    pub fn open(location: &str) -> Result<Lake> {
        let bad = |reason: String| ConnectorError::InvalidLake {
            location: location.to_string(),
            reason,
        };
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket name".into()));
            }
            let store = crate::aws::AwsOptions::default()
                .s3_store(bucket)
                .map_err(|e| bad(e.to_string()))?;
            let store_url =
                Url::parse(&format!("s3://{bucket}/")).map_err(|e| bad(e.to_string()))?;
            return Ok(Lake {
                store: Arc::new(store),
                root: Path::from(prefix.trim_end_matches('/')),
                store_url,
                location: location.trim_end_matches('/').to_string(),
                local_root: None,
                stats: Arc::default(),
            });
        }
        let local = match location.strip_prefix("file://") {
            Some(p) => std::path::PathBuf::from(p),
            None if location.contains("://") => {
                return Err(bad(
                    "unsupported scheme: use a local path, file:// or s3://".into(),
                ));
            }
            None => std::path::PathBuf::from(location),
        };
        std::fs::create_dir_all(&local)
            .map_err(|e| bad(format!("cannot create the directory: {e}")))?;
        let abs = std::fs::canonicalize(&local).map_err(|e| bad(e.to_string()))?;
        let root = Path::from_filesystem_path(&abs).map_err(|e| bad(e.to_string()))?;
        Ok(Lake {
            store: Arc::new(LocalFileSystem::new()),
            root,
            store_url: Url::parse("file:///").expect("static URL"),
            location: abs.display().to_string(),
            local_root: Some(abs),
            stats: Arc::default(),
        })
    }

    /// The object store holding the lake.
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.store)
    }

    /// URL of the object store's root (`file:///` or `s3://bucket/`).
    pub fn store_url(&self) -> &Url {
        &self.store_url
    }

    /// The lake's location, for messages.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// `<lake>/<zone>/<name>`.
    pub fn dir(&self, zone: Zone, name: &str) -> Path {
        let p = self.root.clone().join(zone.dir());
        if name.is_empty() { p } else { p.join(name) }
    }

    /// The URL of `<lake>/<zone>/<name>/` with a trailing slash (a DataFusion table URL).
    pub fn dir_url(&self, zone: Zone, name: &str) -> String {
        format!("{}{}/", self.store_url, self.dir(zone, name))
    }

    /// `<lake>/<zone>/<name>/dt=YYYY-MM-DD/hour=HH` for the hour holding `micros`, or the
    /// Hive default partition for `None`.
    pub fn partition_dir(&self, zone: Zone, name: &str, micros: Option<i64>) -> Path {
        let (dt, hour) = partition_values(micros);
        self.dir(zone, name)
            .join(format!("dt={dt}"))
            .join(format!("hour={hour}"))
    }

    /// Writes a whole object in one request; it becomes visible complete or not at all.
    /// A file of the raw, errors or processed zone counts as committed.
    pub async fn put(&self, path: &Path, bytes: impl Into<PutPayload>) -> Result<()> {
        let payload: PutPayload = bytes.into();
        let size = payload.content_length() as u64;
        self.store.put(path, payload).await?;
        self.committed(path, size, None);
        Ok(())
    }

    /// What was committed to the lake ([`LakeStats`]).
    pub fn stats(&self) -> &LakeStats {
        &self.stats
    }

    /// Counts `path` (`bytes` long) as committed if it is a file of the raw, errors or
    /// processed zone; `first_row_at`: when its first row reached its writer (µs).
    pub fn committed(&self, path: &Path, bytes: u64, first_row_at: Option<i64>) {
        let relative = self.relative(path);
        let mut parts = relative.split('/');
        let zone = match parts.next() {
            Some("raw") => Zone::Raw,
            Some("errors") => Zone::Errors,
            Some("processed") => Zone::Processed,
            _ => return,
        };
        let (Some(name), Some(next)) = (parts.next(), parts.next()) else {
            return;
        };
        self.stats.record(zone, name, bytes, first_row_at);
        if zone == Zone::Processed
            && let Some(day) = partition_day(next)
        {
            self.stats.note_day(name, day);
        }
    }

    /// The earliest `dt` partition (`YYYY-MM-DD`) under `processed/<stream>/`, if any: one
    /// listing of the stream's folder (its `dt=…` prefixes), not of its files.
    pub async fn first_partition_day(&self, stream: &str) -> Result<Option<String>> {
        let dir = self.dir(Zone::Processed, stream);
        let listed = self.store.list_with_delimiter(Some(&dir)).await?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().and_then(partition_day).map(str::to_string))
            .min())
    }

    /// Deletes every object under `<lake>/<zone>/<name>/` (and, on a local lake, the
    /// folders that held them).
    pub async fn remove_dir(&self, zone: Zone, name: &str) -> Result<()> {
        for o in self.list(&self.dir(zone, name)).await? {
            self.delete(&o).await?;
        }
        if let Some(root) = &self.local_root {
            let local = root.join(zone.dir()).join(name);
            match std::fs::remove_dir_all(&local) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ConnectorError::InvalidLake {
                        location: local.display().to_string(),
                        reason: format!("cannot remove the folder: {e}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Whether any object lies under `dir` (reads one listing page at most).
    pub async fn any_object(&self, dir: &Path) -> Result<bool> {
        use futures::StreamExt;
        match self.store.list(Some(dir)).next().await {
            None | Some(Err(object_store::Error::NotFound { .. })) => Ok(false),
            Some(Ok(_)) => Ok(true),
            Some(Err(e)) => Err(e.into()),
        }
    }

    /// Every object under `dir`, recursively (none when it does not exist).
    pub async fn list(&self, dir: &Path) -> Result<Vec<Path>> {
        use futures::TryStreamExt;
        match self.store.list(Some(dir)).try_collect::<Vec<_>>().await {
            Ok(objects) => Ok(objects.into_iter().map(|o| o.location).collect()),
            Err(object_store::Error::NotFound { .. }) => Ok(vec![]),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes an object; one that does not exist is not an error.
    pub async fn delete(&self, path: &Path) -> Result<()> {
        match self.store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes a whole object only if none exists at `path` (`If-None-Match: *` on S3, a
    /// hard link on a local directory); returns whether it was written.
    pub async fn put_if_absent(&self, path: &Path, bytes: impl Into<PutPayload>) -> Result<bool> {
        let opts = object_store::PutOptions {
            mode: object_store::PutMode::Create,
            ..Default::default()
        };
        match self.store.put_opts(path, bytes.into(), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads a whole object, or `None` if it does not exist.
    pub async fn get_opt(&self, path: &Path) -> Result<Option<bytes::Bytes>> {
        match self.store.get(path).await {
            Ok(r) => Ok(Some(r.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// Lake paths relative to its root (as checkpoints record them).
impl Lake {
    /// The absolute store path of `relative` (a `/`-separated path under the root).
    pub fn absolute(&self, relative: &str) -> sluice_engine::Result<Path> {
        let full = if self.root.as_ref().is_empty() {
            relative.to_string()
        } else {
            format!("{}/{relative}", self.root)
        };
        Path::parse(full).map_err(|e| sluice_engine::EngineError::external("lake path", e))
    }

    /// `path` relative to the root.
    pub fn relative(&self, path: &Path) -> String {
        let root = self.root.as_ref();
        let p = path.as_ref();
        if root.is_empty() {
            return p.to_string();
        }
        p.strip_prefix(root)
            .map(|r| r.trim_start_matches('/'))
            .unwrap_or(p)
            .to_string()
    }
}

fn lake_error(
    what: &str,
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> sluice_engine::EngineError {
    sluice_engine::EngineError::external(format!("lake: {what}"), e)
}

#[async_trait::async_trait]
impl sluice_engine::checkpoint::CheckpointStore for Lake {
    async fn put(&self, path: &str, bytes: bytes::Bytes) -> sluice_engine::Result<()> {
        let p = self.absolute(path)?;
        self.store
            .put(&p, bytes.into())
            .await
            .map_err(|e| lake_error(path, e))?;
        Ok(())
    }

    async fn put_new(&self, path: &str, bytes: bytes::Bytes) -> sluice_engine::Result<bool> {
        let p = self.absolute(path)?;
        match self.put_if_absent(&p, bytes).await {
            Ok(written) => Ok(written),
            Err(e) => Err(lake_error(path, e)),
        }
    }

    async fn get(&self, path: &str) -> sluice_engine::Result<Option<bytes::Bytes>> {
        let p = self.absolute(path)?;
        self.get_opt(&p).await.map_err(|e| lake_error(path, e))
    }

    async fn list(&self, prefix: &str) -> sluice_engine::Result<Vec<String>> {
        use futures::TryStreamExt;
        let p = self.absolute(prefix)?;
        match self.store.list(Some(&p)).try_collect::<Vec<_>>().await {
            Ok(objects) => Ok(objects.iter().map(|o| self.relative(&o.location)).collect()),
            Err(object_store::Error::NotFound { .. }) => Ok(vec![]),
            Err(e) => Err(lake_error(prefix, e)),
        }
    }

    async fn delete(&self, path: &str) -> sluice_engine::Result<()> {
        let p = self.absolute(path)?;
        match self.store.delete(&p).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(lake_error(path, e)),
        }
    }

    async fn delete_all(&self, paths: &[String]) -> sluice_engine::Result<()> {
        use futures::StreamExt;
        let absolute = paths
            .iter()
            .map(|p| self.absolute(p))
            .collect::<sluice_engine::Result<Vec<Path>>>()?;
        let mut deleted = self
            .store
            .delete_stream(futures::stream::iter(absolute.into_iter().map(Ok)).boxed());
        while let Some(r) = deleted.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(lake_error("deleting replaced files", e)),
            }
        }
        Ok(())
    }

    async fn publish(
        &self,
        file: &sluice_engine::checkpoint::StagedFile,
    ) -> sluice_engine::Result<()> {
        let (staged, target) = (&file.staged, &file.target);
        let (from, to) = (self.absolute(staged)?, self.absolute(target)?);
        match self.store.rename(&from, &to).await {
            Ok(()) => {
                // A compaction's files hold rows committed before: not counted again.
                if !compaction::is_compaction_file(staged) {
                    self.committed(&to, file.bytes, file.first_row_at);
                }
                Ok(())
            }
            Err(object_store::Error::NotFound { .. }) => match self.store.head(&to).await {
                Ok(_) => Ok(()), // published before a crash
                Err(e) => Err(lake_error(
                    &format!("staged file {staged} is gone and {target} is not there"),
                    e,
                )),
            },
            Err(e) => Err(lake_error(&format!("publishing {staged}"), e)),
        }
    }

    async fn stage_errors(
        &self,
        name: &str,
        records: &[sluice_engine::BadRecord],
        at_micros: i64,
        file: &str,
    ) -> sluice_engine::Result<sluice_engine::checkpoint::StagedFile> {
        let zone = RecordZone::new(self.clone(), Zone::Errors, name).staging();
        zone.put_bad_records_named(records, sluice_engine::EventTime(at_micros), file)
            .await
            .map_err(|e| lake_error(&format!("errors of {name}"), e))?;
        zone.take_staged()
            .pop()
            .ok_or_else(|| sluice_engine::EngineError::Internal("no errors file staged".into()))
    }
}

/// The `dt` and `hour` partition values for a time in microseconds (`None`: Hive's default
/// partition, for rows without an event time).
pub fn partition_values(micros: Option<i64>) -> (String, String) {
    const DEFAULT: &str = "__HIVE_DEFAULT_PARTITION__";
    match micros.and_then(DateTime::from_timestamp_micros) {
        Some(t) => (
            format!("{:04}-{:02}-{:02}", t.year(), t.month(), t.day()),
            format!("{:02}", t.hour()),
        ),
        None => (DEFAULT.to_string(), DEFAULT.to_string()),
    }
}

/// The day of a `dt=YYYY-MM-DD` folder name (not Hive's default partition).
fn partition_day(folder: &str) -> Option<&str> {
    let day = folder.strip_prefix("dt=")?;
    let b = day.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    (b.len() == 10 && b[4] == b'-' && b[7] == b'-' && digits(0..4) && digits(5..7) && digits(8..10))
        .then_some(day)
}

/// Today's `dt` (UTC).
pub fn today() -> String {
    partition_values(Some(sluice_engine::EventTime::now().micros())).0
}

/// A file name unique across processes, ordered by creation time:
/// `<micros>-<random>.<ext>`.
pub fn unique_file_name(ext: &str) -> String {
    let now = sluice_engine::EventTime::now().micros();
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{now:016}-{}.{ext}", &id[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_hive_style_by_utc_hour() {
        // 2024-03-05T07:59:59.999999Z
        let t = 1_709_625_599_999_999;
        assert_eq!(
            partition_values(Some(t)),
            ("2024-03-05".into(), "07".into())
        );
        assert_eq!(
            partition_values(None).0,
            "__HIVE_DEFAULT_PARTITION__".to_string()
        );
    }

    #[tokio::test]
    async fn local_lake_layout() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
        let p = lake.partition_dir(Zone::Processed, "s", Some(0));
        assert!(
            p.as_ref().ends_with("processed/s/dt=1970-01-01/hour=00"),
            "{p}"
        );
        assert!(lake.dir_url(Zone::Processed, "s").starts_with("file:///"));
        assert!(
            lake.dir_url(Zone::Processed, "s")
                .ends_with("/processed/s/")
        );
        lake.put(&p.clone().join("x.txt"), b"hi".to_vec())
            .await
            .unwrap();
        assert_eq!(
            lake.get_opt(&p.clone().join("x.txt"))
                .await
                .unwrap()
                .unwrap()
                .as_ref(),
            b"hi"
        );
        assert!(
            lake.get_opt(&p.clone().join("nope"))
                .await
                .unwrap()
                .is_none()
        );
    }
}
