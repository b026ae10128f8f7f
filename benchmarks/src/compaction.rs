//! `compaction`: how fast a closed hour partition is compacted, and what it saves readers.
//!
//! One hour of Nexmark-shaped bids is written as a stream writes it at the defaults: one
//! Parquet file per 10-second checkpoint (360 files), each holding its 10 seconds of event
//! time a little out of order. The partition is copied, then compacted exactly as a stream's
//! lake writer does it ([`PartitionCompactor`], then the commit's phase two), timed in wall
//! and CPU time (the process does nothing else meanwhile). DuckDB then reads the copy (before)
//! and the compacted partition (after), alternately, five times each: the median of each is
//! printed. The count and checksum DuckDB computes must be the same before and after, and
//! the count the rows written, or no figure is printed.
//!
//! DuckDB runs in the test services' Python (`SLUICE_TEST_PYTHON`, else `python3`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arrow::array::{Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use sluice_connectors::lake::{Lake, MICROS_PER_HOUR, PartitionCompactor, Zone, is_data_file};
use sluice_engine::checkpoint::CheckpointStore;

/// Files the hour is written as (a 10-second checkpoint interval).
const FILES: i64 = 360;
/// The hour: 2024-01-01T00:00Z.
const HOUR: i64 = 473_352;
/// What the stream's files are compacted into.
const TARGET_FILE_SIZE: u64 = 128 * 1024 * 1024;
/// DuckDB reads of each layout.
const READS: usize = 5;

fn schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("auction", DataType::Int64, false),
        Field::new("bidder", DataType::Int64, false),
        Field::new("price", DataType::Int64, false),
        Field::new("channel", DataType::Utf8, true),
        Field::new("url", DataType::Utf8, true),
        Field::new("ts", ts, false),
    ]))
}

/// The `file`-th of the hour's files: `rows` bids of its 10 seconds, up to a second out of
/// order.
fn file_rows(file: i64, rows: i64, first: i64) -> anyhow::Result<RecordBatch> {
    let slice = MICROS_PER_HOUR / FILES;
    let start = HOUR * MICROS_PER_HOUR + file * slice;
    let mix = |i: i64, k: i64| (i.wrapping_mul(6_364_136_223_846_793_005) ^ k).rem_euclid(1 << 40);
    let ids: Vec<i64> = (first..first + rows).collect();
    let ts = ids.iter().map(|&i| {
        let base = start + (i - first) * slice / rows;
        (base - mix(i, 17) % 1_000_000).clamp(start, start + slice - 1)
    });
    let channels = ["apple", "google", "facebook", "baidu"];
    Ok(RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(Int64Array::from_iter_values(
                ids.iter().map(|&i| mix(i, 1) % 1000),
            )),
            Arc::new(Int64Array::from_iter_values(ids.iter().copied())),
            Arc::new(Int64Array::from_iter_values(
                ids.iter().map(|&i| mix(i, 3) % 100_000),
            )),
            Arc::new(StringArray::from_iter_values(
                ids.iter().map(|&i| channels[(mix(i, 5) % 4) as usize]),
            )),
            Arc::new(StringArray::from_iter_values(
                ids.iter()
                    .map(|&i| format!("https://www.nexmark.com/{:010}", mix(i, 7))),
            )),
            Arc::new(TimestampMicrosecondArray::from_iter_values(ts).with_timezone("UTC")),
        ],
    )?)
}

/// Runs the benchmark with `events` rows in the hour; prints its lines.
pub async fn run(events: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let lake = Lake::open(dir.path().to_str().context("a UTF-8 temp path")?)?;
    let partition = lake.partition_dir(Zone::Processed, "bids", Some(HOUR * MICROS_PER_HOUR));
    let events = events as i64;
    let per_file = (events / FILES).max(1);
    let mut written = 0;
    for f in 0..FILES {
        let rows = if f == FILES - 1 {
            events - written
        } else {
            per_file
        };
        let batch = file_rows(f, rows, written)?;
        written += rows;
        let mut buf = vec![];
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build();
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, schema(), Some(props))?;
        w.write(&batch)?;
        w.close()?;
        let name = format!("{f:016}-0000000000.parquet");
        lake.put(&partition.clone().join(name.as_str()), buf)
            .await?;
    }
    let local = dir.path().join("processed/bids/dt=2024-01-01/hour=00");
    let before_dir = dir.path().join("before");
    std::fs::create_dir_all(&before_dir)?;
    let mut before_bytes = 0;
    for e in std::fs::read_dir(&local)? {
        let e = e?;
        before_bytes += e.metadata()?.len();
        std::fs::copy(e.path(), before_dir.join(e.file_name()))?;
    }

    let compactor = PartitionCompactor::new(
        lake.clone(),
        "bids",
        schema(),
        Some("ts".into()),
        TARGET_FILE_SIZE,
    );
    let (cpu0, wall0) = (crate::cpu_time(), Instant::now());
    let compacted = compactor
        .compact(HOUR)
        .await?
        .context("the hour was compacted")?;
    for f in &compacted.files {
        lake.publish(f).await?;
        lake.delete_all(&f.retires).await?;
    }
    let (cpu, wall) = (crate::cpu_time() - cpu0, wall0.elapsed());
    let after: Vec<_> = std::fs::read_dir(&local)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(is_data_file))
        .collect();
    let after_bytes: u64 = after
        .iter()
        .map(|e| e.metadata().map_or(0, |m| m.len()))
        .sum();
    if compacted.marker.rows != events as u64
        || after.len() as u64 > after_bytes.div_ceil(TARGET_FILE_SIZE)
    {
        bail!(
            "compaction wrote {} rows in {} files of {after_bytes} bytes; {events} rows expected",
            compacted.marker.rows,
            after.len()
        );
    }

    let glob = |d: &std::path::Path| format!("{}/*.parquet", d.display());
    let (before, after_reads) = duckdb_reads(&glob(&before_dir), &glob(&local))?;
    if before.0 != after_reads.0 || before.0.0 != events {
        bail!(
            "DuckDB read {:?} before and {:?} after compaction ({events} rows written)",
            before.0,
            after_reads.0
        );
    }
    println!(
        "compaction of one hour ({events} bids): {FILES} files of {:.1} MB -> {} of {:.1} MB in {:.2} s wall, {:.2} s CPU: {:.0} rows/s, {:.0} rows per CPU-second",
        before_bytes as f64 / 1e6,
        after.len(),
        after_bytes as f64 / 1e6,
        wall.as_secs_f64(),
        cpu.as_secs_f64(),
        events as f64 / wall.as_secs_f64(),
        events as f64 / cpu.as_secs_f64(),
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "  DuckDB count + checksum of the hour (median of {READS}): {:.1} ms over the {FILES} files, {:.1} ms compacted",
        ms(before.1),
        ms(after_reads.1)
    );
    Ok(())
}

/// (count, checksum) and the median read time of the files `before`, then of `after`, read
/// alternately.
type Read = ((i64, String), Duration);

fn duckdb_reads(before: &str, after: &str) -> anyhow::Result<(Read, Read)> {
    let python = std::env::var("SLUICE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = r#"
import json, statistics, sys, time
import duckdb
con = duckdb.connect()
query = ("SELECT count(*), sum(hash(auction, bidder, price, channel, url, ts))::VARCHAR "
         "FROM read_parquet('{}')")
out = {}
times = {"before": [], "after": []}
for _ in range(int(sys.argv[3])):
    for name, glob in (("before", sys.argv[1]), ("after", sys.argv[2])):
        started = time.perf_counter()
        out[name] = con.execute(query.format(glob)).fetchone()
        times[name].append(time.perf_counter() - started)
print(json.dumps({k: [out[k][0], out[k][1], statistics.median(times[k])] for k in out}))
"#;
    let run = std::process::Command::new(&python)
        .args(["-c", script, before, after, &READS.to_string()])
        .output()
        .with_context(|| format!("running {python} (DuckDB)"))?;
    if !run.status.success() {
        bail!(
            "DuckDB in {python} failed (set SLUICE_TEST_PYTHON to the Python `scripts/services.sh` installs): {}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&run.stdout)?;
    let read = |k: &str| -> anyhow::Result<Read> {
        let r = &v[k];
        Ok((
            (
                r[0].as_i64().context("a count")?,
                r[1].as_str().context("a checksum")?.to_string(),
            ),
            Duration::from_secs_f64(r[2].as_f64().context("a time")?),
        ))
    };
    Ok((read("before")?, read("after")?))
}
