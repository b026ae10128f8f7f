//! `ParquetLakeWriter`: the processed-zone sink of a stream.
//!
//! Writes each row to `processed/<stream>/dt=…/hour=…/` by the hour of its event time (the
//! stream's event-time column; rows of a stream without one are placed by arrival time).
//! One open file per partition; a file is closed — and only then visible — when it reaches
//! `target_file_size`, when it has been open for `rollover_interval`, or when the stream
//! ends. Types are normalised so Athena can read them (see [`lake_schema`]).
//!
//! With checkpoints ([`ParquetLakeWriter::with_checkpoints`]) files are written under
//! `_sluice/staging/<stream>/` instead; every barrier closes the open files and reports them
//! with the epoch, and the checkpoint coordinator moves them into place once the epoch is
//! committed (two-phase commit). A stopped stream (server shutdown) leaves its uncommitted
//! files staged: the next start deletes them and replays their rows from the sources.
//!
//! With checkpoints the writer also compacts closed hours ([`ParquetLakeWriter::with_compaction`]):
//! a background task stages the hour's files rewritten, sorted, with its `_SUCCESS` marker
//! (see `compaction.rs`), and the writer reports them with the next barrier like its own.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, Int64Array, TimestampMicrosecondArray};
use arrow::compute::kernels::cmp::eq;
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use futures::FutureExt;
use object_store::buffered::BufWriter;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use sluice_engine::checkpoint::{CheckpointHandle, Payload, StagedFile};
use sluice_engine::sink::FileRolling;
use sluice_engine::{Barrier, EngineError, Sink};
use tokio_util::sync::CancellationToken;

use super::compaction::{Compacted, PartitionCompactor, PartitionMarker};
use super::{Lake, MICROS_PER_HOUR, Zone, unique_file_name};

/// The schema a stream's rows have in the lake: every timestamp becomes
/// `Timestamp(Microsecond, "UTC")` (Parquet `INT64 TIMESTAMP(MICROS, UTC)`), unsigned
/// integers become the next wider signed type (Athena has none), everything else is kept.
pub fn lake_schema(schema: &Schema) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_data_type(lake_type(f.data_type())))
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

fn lake_type(t: &DataType) -> DataType {
    match t {
        DataType::Timestamp(_, _) => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        DataType::UInt8 => DataType::Int16,
        DataType::UInt16 => DataType::Int32,
        DataType::UInt32 | DataType::UInt64 => DataType::Int64,
        other => other.clone(),
    }
}

struct OpenFile {
    writer: AsyncArrowWriter<BufWriter>,
    opened: Instant,
    /// Where it becomes visible (without checkpoints: where it is written).
    target: object_store::path::Path,
    /// When its first row came, µs since the Unix epoch (the lake's latency counts from it).
    first_row_at: i64,
    /// With checkpoints: the staged file (`writer` writes it) and its final place.
    staged: Option<StagedFile>,
}

/// A writer's part in checkpoints.
struct Staging {
    handle: CheckpointHandle,
    /// Cancelled when the stream stops: then the end of input is not its real end.
    cancel: CancellationToken,
    /// Files closed in the current epoch.
    closed: Vec<StagedFile>,
}

/// Called when a partition is final: its compacted files and marker are published.
pub type OnFinal = Arc<dyn Fn(&PartitionMarker) + Send + Sync>;

/// A stream's compactions so far (for its metrics).
#[derive(Debug, Default)]
pub struct CompactionCounts {
    /// Hours compacted and marked complete (published).
    pub done: AtomicU64,
    /// Compactions that failed (each is retried a minute later).
    pub failed: AtomicU64,
}

/// A writer's compactions (with checkpoints only: they commit through them).
///
/// Every file the writer stages gets a sequence number in report order; the coordinator
/// counts the writer's files as it publishes them (`published`), so file `n` is published
/// once that count reaches `n`. An hour is compacted when it is closed, it has no open file,
/// all its files are published, and no compaction of it waits to be: so a compaction never
/// reads a partition another one is about to change, nor marks one complete while rows of it
/// are still on their way.
struct Compactions {
    compactor: PartitionCompactor,
    /// µs past an hour's end at which it closes.
    closes_after: i64,
    /// Partitions by event time (the watermark closes them), else by arrival (the clock).
    by_event_time: bool,
    watermark: Option<i64>,
    /// Hours with files no compaction has read: hour → sequence number of its last file.
    dirty: BTreeMap<i64, u64>,
    /// After a start: the listing of partitions that are not final.
    scan: Option<tokio::task::JoinHandle<crate::error::Result<Vec<i64>>>>,
    /// The compaction running, of which hour.
    running: Option<(
        i64,
        tokio::task::JoinHandle<sluice_engine::Result<Option<Compacted>>>,
    )>,
    /// Compactions staged, by hour: the sequence number of their last file, and the marker.
    reported: BTreeMap<i64, (u64, PartitionMarker)>,
    /// Hours whose compaction failed: retried from this instant on.
    retry_at: BTreeMap<i64, Instant>,
    /// Files staged so far (the last sequence number given).
    staged: u64,
    /// Files published so far (counted by the coordinator).
    published: Arc<AtomicU64>,
    /// Sequence numbers of compaction files not yet published, and how many were.
    compaction_files: std::collections::VecDeque<u64>,
    compaction_files_published: u64,
    on_final: Option<OnFinal>,
    counts: Arc<CompactionCounts>,
}

/// How long a failed compaction waits before it is tried again.
const COMPACTION_RETRY: Duration = Duration::from_secs(60);

/// The processed-zone writer of one stream. See the module docs.
pub struct ParquetLakeWriter {
    lake: Lake,
    stream: String,
    schema: SchemaRef,
    event_time_column: Option<usize>,
    config: FileRolling,
    open: BTreeMap<Option<i64>, OpenFile>,
    files_written: Arc<AtomicU64>,
    staging: Option<Staging>,
    compactions: Option<Compactions>,
}

impl ParquetLakeWriter {
    /// A writer for `stream`, whose batches have `input_schema`; `event_time_column` names
    /// the column that decides the partition; `files_written` counts files made visible.
    pub fn new(
        lake: Lake,
        stream: impl Into<String>,
        input_schema: &Schema,
        event_time_column: Option<&str>,
        config: FileRolling,
        files_written: Arc<AtomicU64>,
    ) -> Self {
        let schema = lake_schema(input_schema);
        let event_time_column = event_time_column
            .and_then(|c| schema.index_of(c).ok())
            .filter(|i| matches!(schema.field(*i).data_type(), DataType::Timestamp(..)));
        Self {
            lake,
            stream: stream.into(),
            schema,
            event_time_column,
            config,
            open: BTreeMap::new(),
            files_written,
            staging: None,
            compactions: None,
        }
    }

    /// Writes through the two-phase commit of checkpoints (see the module docs); `cancel`
    /// is the stream's.
    pub fn with_checkpoints(mut self, handle: CheckpointHandle, cancel: CancellationToken) -> Self {
        self.staging = Some(Staging {
            handle,
            cancel,
            closed: vec![],
        });
        self
    }

    /// Compacts the stream's closed hour partitions as `config.compaction` says (with
    /// checkpoints only: call after [`ParquetLakeWriter::with_checkpoints`]); `on_final` is
    /// called for each partition once its compacted files and marker are published, and
    /// `counts` counts those and the failures.
    pub fn with_compaction(
        mut self,
        on_final: Option<OnFinal>,
        counts: Arc<CompactionCounts>,
    ) -> Self {
        let Some(c) = self.config.compaction.filter(|_| self.staging.is_some()) else {
            return self;
        };
        let event_time = self
            .event_time_column
            .map(|i| self.schema.field(i).name().clone());
        let compactor = PartitionCompactor::new(
            self.lake.clone(),
            self.stream.clone(),
            Arc::clone(&self.schema),
            event_time,
            self.config.target_file_size,
        );
        let scan = {
            let compactor = compactor.clone();
            tokio::spawn(async move { compactor.open_hours().await })
        };
        self.compactions = Some(Compactions {
            compactor,
            closes_after: c.closes_after_micros(),
            by_event_time: self.event_time_column.is_some(),
            watermark: None,
            dirty: BTreeMap::new(),
            scan: Some(scan),
            running: None,
            reported: BTreeMap::new(),
            retry_at: BTreeMap::new(),
            staged: 0,
            published: Arc::new(AtomicU64::new(0)),
            compaction_files: Default::default(),
            compaction_files_published: 0,
            on_final,
            counts,
        });
        self
    }

    /// The counter the coordinator advances as it publishes this writer's files.
    fn publish_counter(&self) -> Arc<AtomicU64> {
        match &self.compactions {
            Some(c) => Arc::clone(&c.published),
            None => Arc::clone(&self.files_written),
        }
    }

    /// Closes a file: visible at once, or (with checkpoints) staged for the epoch.
    async fn close_one(&mut self, file: OpenFile, hour: Option<i64>) -> sluice_engine::Result<()> {
        let staged = file.staged.clone();
        let counter = if staged.is_some() {
            None // counted when published
        } else {
            Some(self.files_written.as_ref())
        };
        let (target, first_row_at) = (file.target.clone(), file.first_row_at);
        let bytes = close_file(file, &self.stream, counter).await?;
        match (&mut self.staging, staged) {
            (Some(s), Some(f)) => {
                s.closed.push(f.with_stats(bytes, Some(first_row_at)));
                if let Some(c) = &mut self.compactions {
                    c.staged += 1;
                    if let Some(h) = hour {
                        c.dirty.insert(h, c.staged);
                    }
                }
            }
            _ => self.lake.committed(&target, bytes, Some(first_row_at)),
        }
        Ok(())
    }

    /// Moves compactions along: publication seen, a finished one staged, the next started.
    fn compact(&mut self) {
        let (Some(c), Some(staging)) = (&mut self.compactions, &mut self.staging) else {
            return;
        };
        let published = c.published.load(Ordering::Acquire);
        while c.compaction_files.front().is_some_and(|&n| n <= published) {
            c.compaction_files.pop_front();
            c.compaction_files_published += 1;
        }
        self.files_written
            .store(published - c.compaction_files_published, Ordering::Relaxed);
        let finals: Vec<i64> = c
            .reported
            .iter()
            .filter(|(_, (n, _))| *n <= published)
            .map(|(h, _)| *h)
            .collect();
        for h in finals {
            let (_, marker) = c.reported.remove(&h).expect("listed above");
            c.counts.done.fetch_add(1, Ordering::Relaxed);
            tracing::info!(stream = %marker.stream, dt = %marker.dt, hour = %marker.hour, rows = marker.rows, files = marker.files.len(), "partition compacted and marked complete");
            if let Some(f) = &c.on_final {
                f(&marker);
            }
        }
        if c.scan.as_ref().is_some_and(|t| t.is_finished()) {
            let scan = c.scan.take().expect("checked");
            match scan.now_or_never() {
                Some(Ok(Ok(hours))) => {
                    for h in hours {
                        c.dirty.entry(h).or_insert(0);
                    }
                }
                Some(Ok(Err(e))) => {
                    tracing::warn!(stream = %self.stream, error = %e, "listing the stream's partitions to compact failed; only partitions written from now on are compacted");
                }
                _ => {}
            }
        }
        if c.running.as_ref().is_some_and(|(_, t)| t.is_finished()) {
            let (hour, task) = c.running.take().expect("checked");
            match task.now_or_never() {
                Some(Ok(Ok(Some(done)))) => {
                    tracing::debug!(stream = %self.stream, hour, replaced = done.replaced, files = done.files.len(), "compaction staged");
                    for f in done.files {
                        staging.closed.push(f);
                        c.staged += 1;
                        c.compaction_files.push_back(c.staged);
                    }
                    c.reported.insert(hour, (c.staged, done.marker));
                }
                Some(Ok(Ok(None))) => {}
                Some(Ok(Err(e))) => {
                    c.counts.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(stream = %self.stream, hour, error = %e, "compacting a partition failed; retrying in a minute");
                    c.dirty.entry(hour).or_insert(0);
                    c.retry_at.insert(hour, Instant::now() + COMPACTION_RETRY);
                }
                Some(Err(e)) => {
                    c.counts.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(stream = %self.stream, hour, error = %e, "a compaction task failed; retrying in a minute");
                    c.dirty.entry(hour).or_insert(0);
                    c.retry_at.insert(hour, Instant::now() + COMPACTION_RETRY);
                }
                None => {}
            }
        }
        if c.running.is_some() {
            return;
        }
        let now = if c.by_event_time {
            match c.watermark {
                Some(w) => w,
                None => return,
            }
        } else {
            sluice_engine::EventTime::now().micros()
        };
        let open = &self.open;
        let due = c.dirty.iter().find(|(h, last)| {
            let end = (**h + 1).saturating_mul(MICROS_PER_HOUR);
            now >= end.saturating_add(c.closes_after)
                && !open.contains_key(&Some(**h))
                && **last <= published
                && !c.reported.contains_key(h)
                && c.retry_at.get(h).is_none_or(|t| Instant::now() >= *t)
        });
        if let Some((&hour, _)) = due {
            c.dirty.remove(&hour);
            c.retry_at.remove(&hour);
            let compactor = c.compactor.clone();
            c.running = Some((
                hour,
                tokio::spawn(async move { compactor.compact(hour).await }),
            ));
        }
    }

    /// Stops a running compaction (what it staged is deleted on the next start, and a
    /// compaction staged but not reported is simply not committed).
    fn stop_compactions(&mut self) {
        if let Some(c) = &mut self.compactions {
            if let Some((_, t)) = c.running.take() {
                t.abort();
            }
            if let Some(t) = c.scan.take() {
                t.abort();
            }
        }
    }

    /// Closes every open file.
    async fn close_all(&mut self) -> sluice_engine::Result<()> {
        for (h, f) in std::mem::take(&mut self.open) {
            self.close_one(f, h).await?;
        }
        Ok(())
    }

    /// Casts `batch` to the lake schema where a type differs.
    fn normalise(&self, batch: RecordBatch) -> sluice_engine::Result<RecordBatch> {
        if batch.schema().fields() == self.schema.fields() {
            return Ok(batch);
        }
        let columns = batch
            .columns()
            .iter()
            .zip(self.schema.fields())
            .map(|(c, f)| {
                if c.data_type() == f.data_type() {
                    Ok(Arc::clone(c))
                } else {
                    cast(c, f.data_type())
                }
            })
            .collect::<Result<Vec<ArrayRef>, _>>()?;
        Ok(RecordBatch::try_new(Arc::clone(&self.schema), columns)?)
    }

    /// Splits a batch by partition hour (`None`: no event time).
    fn split_by_hour(
        &self,
        batch: RecordBatch,
    ) -> sluice_engine::Result<Vec<(Option<i64>, RecordBatch)>> {
        let Some(col) = self.event_time_column else {
            let now = sluice_engine::EventTime::now().micros();
            return Ok(vec![(Some(now.div_euclid(MICROS_PER_HOUR)), batch)]);
        };
        let ts = batch
            .column(col)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .ok_or_else(|| EngineError::Internal("event-time column is not µs".into()))?;
        let hours: Int64Array =
            arrow::compute::kernels::arity::unary(ts, |v: i64| v.div_euclid(MICROS_PER_HOUR));
        let (min, max) = (arrow::compute::min(&hours), arrow::compute::max(&hours));
        if hours.null_count() == 0 && min == max {
            return Ok(vec![(min, batch)]);
        }
        let mut distinct: Vec<i64> = hours.iter().flatten().collect();
        distinct.sort_unstable();
        distinct.dedup();
        let mut parts = Vec::with_capacity(distinct.len() + 1);
        for h in distinct {
            let mask = eq(&hours, &Int64Array::new_scalar(h))?;
            parts.push((Some(h), filter_record_batch(&batch, &mask)?));
        }
        if hours.null_count() > 0 {
            let mask = arrow::compute::is_null(&hours)?;
            parts.push((None, filter_record_batch(&batch, &mask)?));
        }
        Ok(parts)
    }

    fn open_file(&self, hour: Option<i64>) -> sluice_engine::Result<OpenFile> {
        let dir = self.lake.partition_dir(
            Zone::Processed,
            &self.stream,
            hour.map(|h| h * MICROS_PER_HOUR),
        );
        let name = unique_file_name("parquet");
        let target = dir.join(name.as_str());
        let (path, staged) = match &self.staging {
            None => (target.clone(), None),
            Some(_) => {
                let path = self
                    .lake
                    .dir(Zone::Internal, "staging")
                    .join(self.stream.as_str())
                    .join(name.as_str());
                let staged =
                    StagedFile::new(self.lake.relative(&path), self.lake.relative(&target));
                (path, Some(staged))
            }
        };
        let writer = AsyncArrowWriter::try_new(
            BufWriter::new(self.lake.store(), path),
            Arc::clone(&self.schema),
            Some(writer_properties()),
        )
        .map_err(|e| EngineError::external("opening a Parquet file", e))?;
        Ok(OpenFile {
            writer,
            opened: Instant::now(),
            target,
            first_row_at: sluice_engine::EventTime::now().micros(),
            staged,
        })
    }
}

/// How the lake's Parquet files are written (the stream's files and compaction's alike).
pub(super) fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build()
}

/// Finishes a file: writes the Parquet footer and completes the upload, which makes the
/// file visible; its size. (A free function: the writer is `Send` but not `Sync`.)
async fn close_file(
    file: OpenFile,
    stream: &str,
    files_written: Option<&std::sync::atomic::AtomicU64>,
) -> sluice_engine::Result<u64> {
    let mut writer = file.writer;
    writer.finish().await.map_err(|e| {
        EngineError::external(format!("stream `{stream}`: closing a Parquet file"), e)
    })?;
    if let Some(counter) = files_written {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(writer.bytes_written() as u64)
}

#[async_trait]
impl Sink for ParquetLakeWriter {
    fn name(&self) -> &str {
        "lake"
    }

    async fn write_batch(&mut self, batch: RecordBatch) -> sluice_engine::Result<()> {
        let batch = self.normalise(batch)?;
        for (hour, part) in self.split_by_hour(batch)? {
            if !self.open.contains_key(&hour) {
                let f = self.open_file(hour)?;
                self.open.insert(hour, f);
            }
            let file = self.open.get_mut(&hour).expect("inserted above");
            file.writer
                .write(&part)
                .await
                .map_err(|e| EngineError::external("writing Parquet", e))?;
            let size = file.writer.bytes_written() + file.writer.in_progress_size();
            if size as u64 >= self.config.target_file_size {
                let f = self.open.remove(&hour).expect("present");
                self.close_one(f, hour).await?;
            }
        }
        Ok(())
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some(
            (self.config.rollover_interval / 4)
                .clamp(Duration::from_millis(50), Duration::from_secs(1)),
        )
    }

    async fn on_tick(&mut self) -> sluice_engine::Result<()> {
        let due: Vec<Option<i64>> = self
            .open
            .iter()
            .filter(|(_, f)| f.opened.elapsed() >= self.config.rollover_interval)
            .map(|(h, _)| *h)
            .collect();
        for h in due {
            let f = self.open.remove(&h).expect("present");
            self.close_one(f, h).await?;
        }
        self.compact();
        Ok(())
    }

    async fn on_watermark(&mut self, t: sluice_engine::EventTime) -> sluice_engine::Result<()> {
        if let Some(c) = &mut self.compactions {
            c.watermark = Some(c.watermark.map_or(t.micros(), |w| w.max(t.micros())));
        }
        Ok(())
    }

    /// Closes the epoch's files and reports them (they become visible when it commits).
    async fn on_barrier(&mut self, b: Barrier) -> sluice_engine::Result<()> {
        let Some(handle) = self.staging.as_ref().map(|s| s.handle.clone()) else {
            return Ok(());
        };
        let Some(report) = handle.on_barrier(b) else {
            return Ok(());
        };
        self.close_all().await?;
        self.compact();
        let published = self.publish_counter();
        let s = self.staging.as_mut().expect("checked above");
        report.report(Payload::Staged {
            files: std::mem::take(&mut s.closed),
            published,
        });
        Ok(())
    }

    async fn close(&mut self) -> sluice_engine::Result<()> {
        if self
            .staging
            .as_ref()
            .is_some_and(|s| s.cancel.is_cancelled())
        {
            // Stopped, not finished: the last checkpoint stands; what was written since is
            // replayed after a restart (its staged files are deleted then).
            self.open.clear();
            self.stop_compactions();
            return Ok(());
        }
        self.close_all().await?;
        self.stop_compactions();
        let published = self.publish_counter();
        if let Some(s) = &mut self.staging {
            s.handle.clone().finish(Payload::Staged {
                files: std::mem::take(&mut s.closed),
                published,
            });
        }
        Ok(())
    }

    async fn abort(&mut self) -> sluice_engine::Result<()> {
        if self.staging.is_none() {
            // Without checkpoints nothing replays a failed stream's rows: keep them.
            return self.close().await;
        }
        // The last checkpoint stands; what was written since is replayed after a restart
        // (its staged files are deleted then).
        self.open.clear();
        self.stop_compactions();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use arrow::array::{Int64Array, TimestampNanosecondArray};
    use parquet::basic::LogicalType;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    use super::*;

    fn files(root: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = vec![];
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    out.push(e.path());
                }
            }
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn rows_land_in_their_event_hour_and_files_appear_only_when_closed() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
        // Nanosecond input (as `CAST(… AS TIMESTAMP)` produces) must land as µs UTC.
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, None), false),
        ]));
        let hour_ns = 3_600_000_000_000i64;
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3])),
                Arc::new(TimestampNanosecondArray::from(vec![10, hour_ns + 5, 20])),
            ],
        )
        .unwrap();
        let written = Arc::new(AtomicU64::new(0));
        let mut w = ParquetLakeWriter::new(
            lake,
            "s",
            &schema,
            Some("ts"),
            FileRolling::default(),
            Arc::clone(&written),
        );
        w.write_batch(batch).await.unwrap();
        let parquet_files = |d: &std::path::Path| {
            files(d)
                .into_iter()
                .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
                .collect::<Vec<_>>()
        };
        assert!(
            parquet_files(dir.path()).is_empty(),
            "nothing visible before close"
        );
        w.close().await.unwrap();
        assert_eq!(written.load(Ordering::Relaxed), 2);
        let got = parquet_files(dir.path());
        let rel: Vec<String> = got
            .iter()
            .map(|p| {
                let r = p.strip_prefix(dir.path()).unwrap().parent().unwrap();
                r.display().to_string()
            })
            .collect();
        assert_eq!(
            rel,
            vec![
                "processed/s/dt=1970-01-01/hour=00",
                "processed/s/dt=1970-01-01/hour=01"
            ]
        );
        let reader = SerializedFileReader::new(std::fs::File::open(&got[0]).unwrap()).unwrap();
        assert_eq!(reader.metadata().file_metadata().num_rows(), 2);
        let ts = &reader.metadata().file_metadata().schema_descr().columns()[1];
        let Some(LogicalType::Timestamp(t)) = ts.logical_type_ref() else {
            panic!("not a timestamp: {:?}", ts.logical_type_ref())
        };
        assert!(t.is_adjusted_to_u_t_c);
        assert!(
            format!("{:?}", t.unit).starts_with("MICROS"),
            "{:?}",
            t.unit
        );
    }

    #[tokio::test]
    async fn files_roll_at_the_target_size_and_after_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        let batch = |n: i64| {
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![Arc::new(Int64Array::from_iter_values(0..n))],
            )
            .unwrap()
        };
        let written = Arc::new(AtomicU64::new(0));
        let config = FileRolling {
            rollover_interval: Duration::from_millis(1),
            target_file_size: 1,
            compaction: None,
        };
        let mut w = ParquetLakeWriter::new(lake, "s", &schema, None, config, Arc::clone(&written));
        // Every batch reaches the 1-byte target: each is a complete, visible file at once.
        for _ in 0..3 {
            w.write_batch(batch(10)).await.unwrap();
        }
        assert_eq!(written.load(Ordering::Relaxed), 3);
        assert_eq!(files(dir.path()).len(), 3);

        // Below the size target, the interval closes the file on the next tick.
        w.config.target_file_size = u64::MAX;
        w.write_batch(batch(10)).await.unwrap();
        assert_eq!(written.load(Ordering::Relaxed), 3);
        tokio::time::sleep(Duration::from_millis(5)).await;
        w.on_tick().await.unwrap();
        assert_eq!(written.load(Ordering::Relaxed), 4);
        let rows: i64 = files(dir.path())
            .iter()
            .map(|f| {
                SerializedFileReader::new(std::fs::File::open(f).unwrap())
                    .unwrap()
                    .metadata()
                    .file_metadata()
                    .num_rows()
            })
            .sum();
        assert_eq!(rows, 40);
    }
}
