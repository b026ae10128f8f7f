//! Compaction of a closed hour partition, and its completeness marker.
//!
//! Contract: [`PartitionCompactor::compact`] reads every data file committed to one
//! `processed/<stream>/dt=…/hour=…/` partition, sorts their rows by the stream's event-time
//! column and writes them to staged files of about `target_file_size` each; it changes
//! nothing in the partition. What it returns is committed like any of the stream's files,
//! through the checkpoint manifest: in phase two the new files are published, the files they
//! replace are deleted ([`StagedFile::retires`]) and then the partition's `_SUCCESS` marker is
//! written. A crash before the commit leaves the old files (the staged ones are deleted on
//! restart and the compaction runs again); a crash after it is finished by recovery, which
//! repeats phase two. Either way every row is in the partition once.
//!
//! The marker ([`PartitionMarker`], JSON) names the files it covers: a partition whose data
//! files are exactly those is final, and one with any other file (a late row's) is open
//! again and compacted once more. Readers that skip files whose names begin with `_`
//! (Athena, Hive, Spark, Trino) and readers of `*.parquet` (DuckDB, DataFusion) never read the
//! marker as data.
//!
//! The rewrite runs as a DataFusion query (`SELECT * … ORDER BY <event time>`) under a memory
//! limit, so a partition larger than the limit is sorted by spilling to disk rather than held
//! whole in memory; one partition is compacted at a time per stream, on one core.

use std::sync::Arc;

use arrow::array::{Array, RecordBatch, TimestampMicrosecondArray};
use arrow::datatypes::SchemaRef;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext, ident};
use futures::StreamExt;
use object_store::path::Path;
use parquet::arrow::AsyncArrowWriter;
use serde::{Deserialize, Serialize};
use sluice_engine::checkpoint::{STAGING_DIR, StagedFile};
use sluice_engine::{EngineError, Result};

use super::{Lake, MICROS_PER_HOUR, Zone, partition_values, unique_file_name};

/// The name of a partition's completeness marker.
pub const MARKER_FILE: &str = "_SUCCESS";

/// The folder under a stream's staging folder where compactions stage their files.
pub const COMPACTION_STAGING: &str = "compaction";

/// How much memory one compaction's sort may hold before it spills to disk.
const SORT_MEMORY: usize = 256 * 1024 * 1024;

/// `processed/<stream>/dt=…/hour=…/_SUCCESS`: the partition is final — compacted, and closed
/// for new rows — and this is what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMarker {
    /// The stream.
    pub stream: String,
    /// The partition's `dt` (`YYYY-MM-DD`).
    pub dt: String,
    /// The partition's `hour` (`HH`).
    pub hour: String,
    /// Rows in the partition.
    pub rows: u64,
    /// Bytes of its data files.
    pub bytes: u64,
    /// The latest event time in it (RFC 3339, UTC); none for a stream placed by arrival
    /// time, or an empty partition.
    pub max_event_time: Option<String>,
    /// The same, µs since the Unix epoch.
    pub max_event_time_micros: Option<i64>,
    /// Its data files (names in the partition folder): the partition is final while these
    /// are all it holds.
    pub files: Vec<String>,
    /// When it was written (RFC 3339, UTC).
    pub completed_at: String,
}

/// A compaction, staged: commit `files` in this order (the last data file retires the old
/// ones; the marker comes last).
#[derive(Debug, Clone)]
pub struct Compacted {
    /// New data files, then the marker.
    pub files: Vec<StagedFile>,
    /// What the marker says.
    pub marker: PartitionMarker,
    /// How many files it replaces.
    pub replaced: usize,
}

/// Compacts the partitions of one stream. See the module docs.
#[derive(Debug, Clone)]
pub struct PartitionCompactor {
    lake: Lake,
    stream: String,
    /// The stream's rows as the lake stores them.
    schema: SchemaRef,
    event_time: Option<String>,
    target_file_size: u64,
}

impl PartitionCompactor {
    /// A compactor for `stream`, whose files have `schema` (the lake schema) and are sorted by
    /// `event_time` (none: kept in the order read), written in files of about
    /// `target_file_size` bytes.
    pub fn new(
        lake: Lake,
        stream: impl Into<String>,
        schema: SchemaRef,
        event_time: Option<String>,
        target_file_size: u64,
    ) -> Self {
        Self {
            lake,
            stream: stream.into(),
            schema,
            event_time,
            target_file_size,
        }
    }

    /// The folder of `hour`'s partition.
    fn partition(&self, hour: i64) -> Path {
        self.lake
            .partition_dir(Zone::Processed, &self.stream, Some(hour * MICROS_PER_HOUR))
    }

    /// Hours of the stream's partitions that are not final: data files and no marker naming
    /// exactly them. One listing of the stream's folder (after a restart: what to look at).
    pub async fn open_hours(&self) -> crate::error::Result<Vec<i64>> {
        let dir = self.lake.dir(Zone::Processed, &self.stream);
        let mut partitions: std::collections::BTreeMap<String, (Vec<String>, bool)> =
            Default::default();
        for path in self.lake.list(&dir).await? {
            let relative = self.lake.relative(&path);
            let Some((folder, name)) = relative.rsplit_once('/') else {
                continue;
            };
            let e = partitions.entry(folder.to_string()).or_default();
            if name == MARKER_FILE {
                e.1 = true;
            } else if is_data_file(name) {
                e.0.push(name.to_string());
            }
        }
        let mut hours = vec![];
        for (folder, (files, marked)) in partitions {
            let Some(hour) = hour_of(&folder) else {
                continue;
            };
            if files.is_empty() {
                continue;
            }
            if marked {
                let marker = self.marker(hour).await?;
                if marker.is_some_and(|m| same_files(&m.files, &files)) {
                    continue;
                }
            }
            hours.push(hour);
        }
        Ok(hours)
    }

    /// The marker of `hour`'s partition, if it has one that reads.
    pub async fn marker(&self, hour: i64) -> crate::error::Result<Option<PartitionMarker>> {
        let path = self.partition(hour).join(MARKER_FILE);
        Ok(self
            .lake
            .get_opt(&path)
            .await?
            .and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// Stages the compaction of `hour`'s partition; `None` when it is final already (its
    /// marker names exactly its files) or holds no data file.
    pub async fn compact(&self, hour: i64) -> Result<Option<Compacted>> {
        let lake_err = |e: crate::error::ConnectorError| {
            EngineError::external(format!("compacting `{}`", self.stream), e)
        };
        let dir = self.partition(hour);
        let mut inputs: Vec<Path> = self
            .lake
            .list(&dir)
            .await
            .map_err(lake_err)?
            .into_iter()
            .filter(|p| p.filename().is_some_and(is_data_file))
            .collect();
        inputs.sort();
        if inputs.is_empty() {
            return Ok(None);
        }
        let names: Vec<String> = inputs
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect();
        if let Some(m) = self.marker(hour).await.map_err(lake_err)?
            && same_files(&m.files, &names)
        {
            return Ok(None);
        }

        let mut config = SessionConfig::new().with_target_partitions(1);
        // Strings as the files hold them (`Utf8`), not as views: the output is written in
        // the stream's schema.
        config
            .options_mut()
            .execution
            .parquet
            .schema_force_view_types = false;
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(SORT_MEMORY, 1.0)
            .build_arc()?;
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        ctx.register_object_store(self.lake.store_url(), self.lake.store());
        let urls: Vec<String> = inputs
            .iter()
            .map(|p| format!("{}{p}", self.lake.store_url()))
            .collect();
        // Files of another definition of the stream (dropped, created again with other
        // columns) are left as they are: rewriting them in this one's columns would lose some.
        // (A file that cannot be read fails the compaction: it is retried, and counted.)
        let mut df = ctx
            .read_parquet(urls, ParquetReadOptions::default())
            .await?;
        if !same_columns(df.schema().as_arrow(), &self.schema) {
            tracing::info!(
                stream = %self.stream,
                hour,
                "a partition of another definition of the stream is not compacted: its files have the columns {}, the stream {}",
                describe(df.schema().as_arrow()),
                describe(&self.schema)
            );
            return Ok(None);
        }
        if let Some(t) = &self.event_time {
            df = df.sort(vec![ident(t).sort(true, true)])?;
        }
        let event_time = self
            .event_time
            .as_ref()
            .and_then(|t| self.schema.index_of(t).ok());
        let mut batches = df.execute_stream().await?;

        let mut files: Vec<StagedFile> = vec![];
        let mut names_out: Vec<String> = vec![];
        let (mut rows, mut bytes, mut max_time) = (0u64, 0u64, None::<i64>);
        let mut open: Option<(
            AsyncArrowWriter<object_store::buffered::BufWriter>,
            StagedFile,
        )> = None;
        while let Some(batch) = batches.next().await {
            let batch = batch?;
            if batch.num_rows() == 0 {
                continue;
            }
            rows += batch.num_rows() as u64;
            if let Some(i) = event_time
                && let Some(ts) = batch
                    .column(i)
                    .as_any()
                    .downcast_ref::<TimestampMicrosecondArray>()
                && let Some(m) = arrow::compute::max(ts)
            {
                max_time = Some(max_time.map_or(m, |t| t.max(m)));
            }
            if open.is_none() {
                open = Some(self.open_output(&dir, &mut names_out)?);
            }
            let (writer, _) = open.as_mut().expect("opened above");
            let batch = RecordBatch::try_new(Arc::clone(&self.schema), batch.columns().to_vec())?;
            writer.write(&batch).await.map_err(parquet_err)?;
            if (writer.bytes_written() + writer.in_progress_size()) as u64 >= self.target_file_size
            {
                // The open row group's size is estimated before compression: close it, and
                // roll only when the file really is that large (so every file but the last
                // is at least the target, and there are at most ⌈bytes / target⌉).
                writer.flush().await.map_err(parquet_err)?;
                if (writer.bytes_written() as u64) < self.target_file_size {
                    continue;
                }
                let (w, f) = open.take().expect("open");
                let n = finish(w).await?;
                bytes += n;
                files.push(f.with_stats(n, None));
            }
        }
        if let Some((w, f)) = open.take() {
            let n = finish(w).await?;
            bytes += n;
            files.push(f.with_stats(n, None));
        }
        let mut retired: Vec<String> = inputs.iter().map(|p| self.lake.relative(p)).collect();
        let replaced = retired.len();
        if let Some(last) = files.last_mut() {
            last.retires = std::mem::take(&mut retired);
        }
        let (dt, hour_value) = partition_values(Some(hour * MICROS_PER_HOUR));
        let marker = PartitionMarker {
            stream: self.stream.clone(),
            dt,
            hour: hour_value,
            rows,
            bytes,
            max_event_time: max_time.map(rfc3339),
            max_event_time_micros: max_time,
            files: names_out,
            completed_at: rfc3339(sluice_engine::EventTime::now().micros()),
        };
        let staged = self.staging_path("marker.json");
        let json = serde_json::to_vec_pretty(&marker).expect("a marker serialises");
        self.lake.put(&staged, json).await.map_err(lake_err)?;
        let mut marker_file = StagedFile::new(
            self.lake.relative(&staged),
            self.lake.relative(&dir.join(MARKER_FILE)),
        );
        // Files without a row leave no data file: then the marker retires them itself.
        marker_file.retires = retired;
        files.push(marker_file);
        Ok(Some(Compacted {
            files,
            marker,
            replaced,
        }))
    }

    /// A staging path for one of a compaction's files.
    fn staging_path(&self, suffix: &str) -> Path {
        let name = unique_file_name(suffix);
        self.lake
            .absolute(&format!(
                "{STAGING_DIR}/{}/{COMPACTION_STAGING}/{name}",
                self.stream
            ))
            .expect("a valid path")
    }

    /// Opens the next output file (staged; its name in the partition goes to `names`).
    fn open_output(
        &self,
        dir: &Path,
        names: &mut Vec<String>,
    ) -> Result<(
        AsyncArrowWriter<object_store::buffered::BufWriter>,
        StagedFile,
    )> {
        let name = unique_file_name("parquet");
        let staged = self.staging_path("parquet");
        let file = StagedFile::new(
            self.lake.relative(&staged),
            self.lake.relative(&dir.clone().join(name.as_str())),
        );
        names.push(name);
        let writer = AsyncArrowWriter::try_new(
            object_store::buffered::BufWriter::new(self.lake.store(), staged),
            Arc::clone(&self.schema),
            Some(super::parquet_writer::writer_properties()),
        )
        .map_err(parquet_err)?;
        Ok((writer, file))
    }
}

async fn finish(mut w: AsyncArrowWriter<object_store::buffered::BufWriter>) -> Result<u64> {
    w.finish().await.map_err(parquet_err)?;
    Ok(w.bytes_written() as u64)
}

fn parquet_err(e: parquet::errors::ParquetError) -> EngineError {
    EngineError::external("compaction: writing Parquet", e)
}

/// Whether `staged` (a staging path relative to the lake) is a compaction's file.
pub(super) fn is_compaction_file(staged: &str) -> bool {
    staged
        .strip_prefix(STAGING_DIR)
        .and_then(|rest| rest.trim_start_matches('/').split('/').nth(1))
        == Some(COMPACTION_STAGING)
}

/// Whether a file in a partition folder holds rows: a `.parquet` file not hidden (names
/// beginning with `_` or `.` are skipped, as Hive and Athena skip them).
pub fn is_data_file(name: &str) -> bool {
    name.ends_with(".parquet") && !name.starts_with('_') && !name.starts_with('.')
}

/// `name type, …`.
fn describe(schema: &arrow::datatypes::Schema) -> String {
    let columns: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| format!("{} {}", f.name(), f.data_type()))
        .collect();
    columns.join(", ")
}

/// Whether two schemas have the same column names and types, in order.
fn same_columns(a: &arrow::datatypes::Schema, b: &arrow::datatypes::Schema) -> bool {
    a.fields().len() == b.fields().len()
        && a.fields()
            .iter()
            .zip(b.fields())
            .all(|(x, y)| x.name() == y.name() && x.data_type() == y.data_type())
}

fn same_files(a: &[String], b: &[String]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort();
    b.sort();
    a == b
}

/// The hour of a `…/dt=YYYY-MM-DD/hour=HH` folder.
fn hour_of(folder: &str) -> Option<i64> {
    let mut parts = folder.rsplit('/');
    let hour: i64 = parts.next()?.strip_prefix("hour=")?.parse().ok()?;
    let day = super::partition_day(parts.next()?)?;
    let date = chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").ok()?;
    let midnight = date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_micros();
    (0..24)
        .contains(&hour)
        .then(|| midnight.div_euclid(MICROS_PER_HOUR) + hour)
}

fn rfc3339(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use sluice_engine::checkpoint::CheckpointStore;

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new("tag", DataType::Utf8, true),
        ]))
    }

    /// Writes one Parquet file of (id, ts) rows into `hour`'s partition.
    async fn put_file(lake: &Lake, hour: i64, rows: &[(i64, i64)]) {
        let batch = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.1))
                        .with_timezone("UTC"),
                ),
                Arc::new(arrow::array::StringArray::from_iter_values(
                    rows.iter().map(|r| format!("tag {}", r.0)),
                )),
            ],
        )
        .unwrap();
        let mut buf = vec![];
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let dir = lake.partition_dir(Zone::Processed, "s", Some(hour * MICROS_PER_HOUR));
        lake.put(&dir.join(unique_file_name("parquet").as_str()), buf)
            .await
            .unwrap();
    }

    /// Phase two, as the coordinator runs it.
    async fn commit(lake: &Lake, c: &Compacted) {
        for f in &c.files {
            lake.publish(f).await.unwrap();
            lake.delete_all(&f.retires).await.unwrap();
        }
    }

    async fn data_files(lake: &Lake, hour: i64) -> Vec<Path> {
        let dir = lake.partition_dir(Zone::Processed, "s", Some(hour * MICROS_PER_HOUR));
        let mut files: Vec<Path> = lake.list(&dir).await.unwrap();
        files.retain(|p| p.filename().is_some_and(is_data_file));
        files.sort(); // names begin with their creation time
        files
    }

    async fn read_ids(lake: &Lake, files: &[Path]) -> Vec<(i64, i64)> {
        let mut out = vec![];
        for f in files {
            let bytes = lake.get_opt(f).await.unwrap().unwrap();
            let reader =
                parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(bytes, 1024)
                    .unwrap();
            for b in reader {
                let b = b.unwrap();
                let ids = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                let ts = b
                    .column(1)
                    .as_any()
                    .downcast_ref::<TimestampMicrosecondArray>()
                    .unwrap();
                out.extend(
                    ids.values()
                        .iter()
                        .copied()
                        .zip(ts.values().iter().copied()),
                );
            }
        }
        out
    }

    #[tokio::test]
    async fn a_partition_is_rewritten_sorted_marked_and_reopened_by_a_late_file() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
        let hour = 475_000; // 2024-03-09T16:00Z
        let t = |m: i64| hour * MICROS_PER_HOUR + m * 60_000_000;
        put_file(&lake, hour, &[(1, t(30)), (2, t(10))]).await;
        put_file(&lake, hour, &[(3, t(50)), (4, t(0))]).await;
        put_file(&lake, hour, &[(5, t(20))]).await;
        put_file(&lake, hour + 1, &[(6, t(70))]).await;
        let compactor =
            PartitionCompactor::new(lake.clone(), "s", schema(), Some("ts".into()), 1 << 20);
        assert_eq!(compactor.open_hours().await.unwrap(), vec![hour, hour + 1]);

        let c = compactor.compact(hour).await.unwrap().unwrap();
        assert_eq!(c.replaced, 3);
        assert_eq!(
            data_files(&lake, hour).await.len(),
            3,
            "nothing changes before the commit"
        );
        commit(&lake, &c).await;
        let files = data_files(&lake, hour).await;
        assert_eq!(files.len(), 1);
        let rows = read_ids(&lake, &files).await;
        assert_eq!(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![4, 2, 5, 1, 3]
        );
        let marker = compactor.marker(hour).await.unwrap().unwrap();
        assert_eq!(marker, c.marker);
        assert_eq!(
            (marker.rows, marker.max_event_time_micros),
            (5, Some(t(50)))
        );
        assert_eq!(marker.files, vec![files[0].filename().unwrap().to_string()]);
        assert_eq!(
            marker.max_event_time.as_deref(),
            Some("2024-03-09T16:50:00.000000Z")
        );
        assert!(
            compactor.compact(hour).await.unwrap().is_none(),
            "final already"
        );
        assert_eq!(compactor.open_hours().await.unwrap(), vec![hour + 1]);

        // A late row reopens the hour: compacted again with the rest, the marker rewritten.
        put_file(&lake, hour, &[(7, t(5))]).await;
        assert_eq!(compactor.open_hours().await.unwrap(), vec![hour, hour + 1]);
        let c = compactor.compact(hour).await.unwrap().unwrap();
        commit(&lake, &c).await;
        // Phase two repeated (recovery) changes nothing.
        commit(&lake, &c).await;
        let files = data_files(&lake, hour).await;
        let rows = read_ids(&lake, &files).await;
        assert_eq!(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![4, 7, 2, 5, 1, 3]
        );
        assert_eq!(compactor.marker(hour).await.unwrap().unwrap().rows, 6);
        // Nothing staged is left behind.
        assert!(
            lake.list(&lake.dir(Zone::Internal, "staging"))
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn files_of_another_definition_of_the_stream_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
        put_file(&lake, 3, &[(1, 3 * MICROS_PER_HOUR)]).await;
        put_file(&lake, 3, &[(2, 3 * MICROS_PER_HOUR + 1)]).await;
        let other = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
        ]));
        let compactor =
            PartitionCompactor::new(lake.clone(), "s", other, Some("ts".into()), 1 << 20);
        assert!(compactor.compact(3).await.unwrap().is_none());
        assert_eq!(data_files(&lake, 3).await.len(), 2);
    }

    #[tokio::test]
    async fn outputs_roll_at_the_target_size() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
        let hour = 10;
        for f in 0..8 {
            let rows: Vec<(i64, i64)> = (0..20_000)
                .map(|i| {
                    (
                        f * 20_000 + i,
                        hour * MICROS_PER_HOUR + (i * 7919 + f) % 3_600_000_000,
                    )
                })
                .collect();
            put_file(&lake, hour, &rows).await;
        }
        let target = 256 * 1024;
        let compactor =
            PartitionCompactor::new(lake.clone(), "s", schema(), Some("ts".into()), target);
        let c = compactor.compact(hour).await.unwrap().unwrap();
        commit(&lake, &c).await;
        let files = data_files(&lake, hour).await;
        let bytes = c.marker.bytes;
        assert!(
            files.len() as u64 <= bytes.div_ceil(target),
            "{} files, {bytes} bytes",
            files.len()
        );
        let mut rows = read_ids(&lake, &files).await;
        assert_eq!(rows.len(), 160_000);
        assert!(
            rows.windows(2).all(|w| w[0].1 <= w[1].1),
            "sorted across files"
        );
        rows.sort();
        assert!(rows.iter().enumerate().all(|(i, r)| r.0 == i as i64));
    }

    #[test]
    fn hours_of_partition_folders() {
        assert_eq!(hour_of("processed/s/dt=1970-01-01/hour=00"), Some(0));
        assert_eq!(hour_of("processed/s/dt=1970-01-02/hour=03"), Some(27));
        assert_eq!(
            hour_of("processed/s/dt=__HIVE_DEFAULT_PARTITION__/hour=x"),
            None
        );
        assert!(is_data_file("0001-ab.parquet"));
        assert!(!is_data_file("_SUCCESS"));
        assert!(!is_data_file(".x.parquet"));
        assert!(is_compaction_file(
            "_sluice/staging/s/compaction/1-a.parquet"
        ));
        assert!(!is_compaction_file("_sluice/staging/s/1-a.parquet"));
    }
}
