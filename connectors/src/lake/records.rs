//! The raw and errors zones: JSON-lines files partitioned by arrival time.
//!
//! An errors-zone line is one JSON object:
//! `{"received_at": "…Z", "origin": "…", "reason": "…", "payload": "…"}` — the payload is
//! kept verbatim as a string, so a record that is not even valid JSON survives intact.

use std::time::Duration;

use object_store::path::Path;
use serde::Serialize;
use sluice_engine::checkpoint::StagedFile;
use sluice_engine::{BadRecord, EventTime};
use tokio::sync::mpsc;

use super::{Lake, Zone, unique_file_name};
use crate::error::Result;

/// Writes JSON-lines files into one zone of one source or stream.
#[derive(Debug, Clone)]
pub struct RecordZone {
    lake: Lake,
    zone: Zone,
    name: String,
    /// Two-phase commit: files are written under `_sluice/staging/` and listed here until
    /// the checkpoint that covers them moves them into place.
    staged: Option<std::sync::Arc<std::sync::Mutex<Vec<StagedFile>>>>,
}

#[derive(Serialize)]
struct ErrorLine<'a> {
    received_at: String,
    origin: &'a str,
    reason: &'a str,
    payload: &'a str,
    /// `base64` when the payload is binary.
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_encoding: Option<&'static str>,
}

impl RecordZone {
    /// The `zone` folder of `name` (a source or stream).
    pub fn new(lake: Lake, zone: Zone, name: impl Into<String>) -> Self {
        Self {
            lake,
            zone,
            name: name.into(),
            staged: None,
        }
    }

    /// The same zone written through checkpoints' two-phase commit: each file is staged,
    /// and [`RecordZone::take_staged`] hands the files staged so far to the checkpoint.
    pub fn staging(mut self) -> Self {
        self.staged = Some(std::sync::Arc::default());
        self
    }

    /// The files staged since the last call.
    pub fn take_staged(&self) -> Vec<StagedFile> {
        match &self.staged {
            Some(s) => std::mem::take(&mut *s.lock().unwrap_or_else(|e| e.into_inner())),
            None => vec![],
        }
    }

    /// Writes a new file at `path`, or stages it for `path`.
    async fn write(&self, path: &Path, bytes: bytes::Bytes) -> Result<()> {
        let Some(staged) = &self.staged else {
            return self.lake.put(path, bytes).await;
        };
        let file = path.filename().unwrap_or("file").to_string();
        let staging = self
            .lake
            .dir(Zone::Internal, "staging")
            .join(self.zone.dir())
            .join(self.name.as_str())
            .join(file.as_str());
        let size = bytes.len() as u64;
        self.lake.put(&staging, bytes).await?;
        staged.lock().unwrap_or_else(|e| e.into_inner()).push(
            StagedFile::new(self.lake.relative(&staging), self.lake.relative(path))
                .with_stats(size, None),
        );
        Ok(())
    }

    fn new_path(&self, ext: &str) -> Path {
        let now = EventTime::now().micros();
        self.lake
            .partition_dir(self.zone, &self.name, Some(now))
            .join(unique_file_name(ext))
    }

    /// The lake this zone is in.
    pub fn lake(&self) -> &Lake {
        &self.lake
    }

    /// Stores `bytes` as one new file named after `seq` (`<arrival µs>-<seq>-<id>.<ext>`),
    /// so a replay finds the files after a position in order. Durable when this returns.
    pub async fn put_sequenced(&self, bytes: bytes::Bytes, seq: u64, ext: &str) -> Result<Path> {
        let now = EventTime::now().micros();
        let id = uuid::Uuid::new_v4().simple().to_string();
        let path = self
            .lake
            .partition_dir(self.zone, &self.name, Some(now))
            .join(format!("{now:016}-{seq:012}-{}.{ext}", &id[..8]));
        self.lake.put(&path, bytes).await?;
        Ok(path)
    }

    /// The files of this zone under `name` stored at or after `since` (µs, arrival time:
    /// the partitions of that hour onwards; `None`: all), with their sequence numbers (see
    /// [`RecordZone::put_sequenced`]; other files are skipped), in sequence order.
    pub async fn sequenced_since(&self, since: Option<i64>) -> Result<Vec<(u64, Path)>> {
        use futures::TryStreamExt;
        let dirs: Vec<Path> = match since {
            None => vec![self.lake.dir(self.zone, &self.name)],
            Some(since) => {
                let last = EventTime::now().micros().div_euclid(super::MICROS_PER_HOUR);
                (since.div_euclid(super::MICROS_PER_HOUR)..=last)
                    .map(|h| {
                        self.lake.partition_dir(
                            self.zone,
                            &self.name,
                            Some(h * super::MICROS_PER_HOUR),
                        )
                    })
                    .collect()
            }
        };
        let mut out = vec![];
        for dir in dirs {
            let files: Vec<_> = self.lake.store().list(Some(&dir)).try_collect().await?;
            for f in files {
                let name = f.location.filename().unwrap_or_default();
                let mut parts = name.split(['-', '.']);
                if let (Some(_), Some(seq)) = (parts.next(), parts.next())
                    && seq.len() == 12
                    && let Ok(seq) = seq.parse::<u64>()
                {
                    out.push((seq, f.location));
                }
            }
        }
        out.sort_by_key(|(seq, _)| *seq);
        Ok(out)
    }

    /// Stores `bytes` as one new file (`ext` names its format, e.g. `ndjson`); returns its
    /// path. Durable and visible when this returns (staged, with [`RecordZone::staging`]).
    pub async fn put_raw(&self, bytes: bytes::Bytes, ext: &str) -> Result<Path> {
        let path = self.new_path(ext);
        self.write(&path, bytes).await?;
        Ok(path)
    }

    /// Stores record values as received, as one new file: text values one per line
    /// (`.ndjson`), binary ones each after its 4-byte big-endian length (`.avro-frames`).
    pub async fn put_values<'a>(
        &self,
        values: impl Iterator<Item = &'a [u8]>,
        binary: bool,
    ) -> Result<Path> {
        let mut body = Vec::new();
        for value in values {
            if binary {
                body.extend_from_slice(&(value.len() as u32).to_be_bytes());
                body.extend_from_slice(value);
            } else {
                body.extend_from_slice(value);
                body.push(b'\n');
            }
        }
        let ext = if binary { "avro-frames" } else { "ndjson" };
        self.put_raw(bytes::Bytes::from(body), ext).await
    }

    /// Stores bad records as one new JSON-lines file. Durable when this returns.
    pub async fn put_bad_records(&self, records: &[BadRecord]) -> Result<Option<Path>> {
        let path = self.new_path("jsonl");
        self.put_bad_records_as(records, EventTime::now(), path)
            .await
    }

    /// Stores bad records received at `at` as the file `name` in the partition of `at`: the
    /// same records give the same file, so writing them again (a retried checkpoint) does not
    /// repeat them.
    pub async fn put_bad_records_named(
        &self,
        records: &[BadRecord],
        at: EventTime,
        name: &str,
    ) -> Result<Option<Path>> {
        let path = self
            .lake
            .partition_dir(self.zone, &self.name, Some(at.micros()))
            .join(name);
        self.put_bad_records_as(records, at, path).await
    }

    async fn put_bad_records_as(
        &self,
        records: &[BadRecord],
        at: EventTime,
        path: Path,
    ) -> Result<Option<Path>> {
        if records.is_empty() {
            return Ok(None);
        }
        let received_at = at.to_string();
        let mut buf = Vec::with_capacity(records.len() * 128);
        for r in records {
            let line = ErrorLine {
                received_at: received_at.clone(),
                origin: &r.origin,
                reason: &r.reason,
                payload: &r.payload,
                payload_encoding: r.payload_base64.then_some("base64"),
            };
            serde_json::to_writer(&mut buf, &line).expect("serialising strings cannot fail");
            buf.push(b'\n');
        }
        self.write(&path, bytes::Bytes::from(buf)).await?;
        Ok(Some(path))
    }
}

/// Drains `input` into the errors zone until every sender is gone, writing one file per
/// `flush_interval` (or per 10 000 records) at most. Failures to write are logged and
/// retried with the next flush; the records stay buffered, so none is dropped. Producers
/// count the records they reject; this task does not count again.
pub async fn run_errors_writer(
    zone: RecordZone,
    mut input: mpsc::Receiver<Vec<BadRecord>>,
    flush_interval: Duration,
) {
    const MAX_BUFFERED: usize = 10_000;
    let mut buffer: Vec<BadRecord> = Vec::new();
    let mut ticker = tokio::time::interval(flush_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let closed = tokio::select! {
            m = input.recv() => match m {
                Some(mut records) => {
                    buffer.append(&mut records);
                    if buffer.len() < MAX_BUFFERED { continue; }
                    false
                }
                None => true,
            },
            _ = ticker.tick() => false,
        };
        if !buffer.is_empty() {
            match zone.put_bad_records(&buffer).await {
                Ok(_) => buffer.clear(),
                Err(e) => {
                    tracing::warn!(zone = %zone.name, error = %e, "cannot write the errors zone; will retry")
                }
            }
        }
        if closed {
            if !buffer.is_empty() {
                // Last attempt at shutdown.
                if let Err(e) = zone.put_bad_records(&buffer).await {
                    tracing::error!(zone = %zone.name, error = %e, lost = buffer.len(), "errors-zone records could not be written at shutdown");
                }
            }
            return;
        }
    }
}
