//! `GET /metrics`: the server's figures in the Prometheus text format.
//!
//! The pipelines count on their hot paths with the same relaxed atomics `SHOW SOURCES /
//! STREAMS / SINKS` read (`engine::Metrics`, one update per batch); nothing on the hot path
//! knows about Prometheus. At each scrape the [`Exporter`] reads those counters
//! ([`Vitals`]) and hands them to its own recorder of the `metrics` facade
//! (`metrics-exporter-prometheus`), which renders the exposition: counters are set to their
//! absolute values, gauges to theirs, and the durations observed since the last scrape
//! (checkpoints, event to lake) are recorded into histograms. One recorder per server, not
//! the process-global one: two servers in one process (the tests) keep their figures apart.
//!
//! Series exist from the moment their source, stream or sink does (at 0); those of a
//! dropped object disappear after [`STALE_AFTER`]. Label values are names of sources,
//! streams, sinks and partitions, and HTTP status codes: bounded, never per key or window.
//! The names are an interface (`deploy/prometheus/alerts.yml`, `deploy/grafana/`): see
//! `docs/operations.md` for each one's meaning.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};
use metrics_util::MetricKindMask;
use sluice_engine::MetricsSnapshot;

/// How long after its object went away a series is dropped from the exposition.
pub const STALE_AFTER: Duration = Duration::from_secs(300);

/// Histogram buckets for checkpoint durations, seconds.
const CHECKPOINT_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Histogram buckets for the event-to-lake latency, seconds.
const LAKE_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// What one scrape reads of a running server.
#[derive(Debug, Default)]
pub struct Vitals {
    /// Per source: its name, counters and whether it failed.
    pub sources: Vec<(String, MetricsSnapshot, bool)>,
    /// Per stream: its name, counters, whether it failed, its state's bytes.
    pub streams: Vec<StreamVitals>,
    /// Per sink: its name, rows delivered, whether it failed.
    pub sinks: Vec<(String, u64, bool)>,
    /// Checkpoint durations since the last scrape.
    pub checkpoint_durations: Vec<Duration>,
    /// When the last checkpoint completed, seconds since the Unix epoch.
    pub checkpoint_last_completed: Option<f64>,
    /// Checkpoints aborted so far.
    pub checkpoint_failures: u64,
    /// How often checkpoints are taken (`None`: no stream takes part).
    pub checkpoint_interval: Option<Duration>,
    /// Files and bytes committed per (zone, name).
    pub lake: Vec<(&'static str, String, u64, u64)>,
    /// Event-to-lake latencies since the last scrape.
    pub lake_latencies: Vec<Duration>,
}

/// One stream's figures.
#[derive(Debug)]
pub struct StreamVitals {
    /// Its name.
    pub name: String,
    /// Its counters.
    pub metrics: MetricsSnapshot,
    /// Whether it failed.
    pub failed: bool,
    /// The bytes of operator state its last checkpoint wrote.
    pub state_bytes: u64,
    /// Failed Glue calls for its table (`None`: no Glue catalog).
    pub glue_failures: Option<u64>,
    /// Hour partitions it compacted and marked complete.
    pub compactions: u64,
    /// Compactions that failed (each retried).
    pub compaction_failures: u64,
}

/// HTTP ingest answers by (source, status code).
#[derive(Debug, Default)]
pub struct HttpCounts(Mutex<BTreeMap<(String, u16), u64>>);

impl HttpCounts {
    /// Counts one answer with `code` to a request for `source` (unknown sources count under
    /// the empty name, so a client cannot make new series by naming sources).
    pub fn count(&self, source: &str, code: u16) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((source.to_string(), code)).or_default() += 1;
    }

    fn snapshot(&self) -> Vec<((String, u16), u64)> {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// Renders one server's `/metrics`.
pub struct Exporter {
    recorder: PrometheusRecorder,
    process: metrics_process::Collector,
    /// HTTP answers, counted by the front door.
    pub http: Arc<HttpCounts>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").finish_non_exhaustive()
    }
}

impl Default for Exporter {
    fn default() -> Self {
        Self::new()
    }
}

impl Exporter {
    /// A fresh exporter with its own recorder.
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("sluice_checkpoint_duration_seconds".into()),
                CHECKPOINT_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("sluice_event_to_lake_seconds".into()),
                    LAKE_BUCKETS,
                )
            })
            .expect("static, non-empty buckets")
            .idle_timeout(
                MetricKindMask::COUNTER | MetricKindMask::GAUGE,
                Some(STALE_AFTER),
            )
            .build_recorder();
        let process = metrics_process::Collector::default();
        let this = Self {
            recorder,
            process,
            http: Arc::default(),
        };
        metrics::with_local_recorder(&this.recorder, || {
            this.process.describe();
            describe();
        });
        this
    }

    /// The exposition: `vitals` and `pg_sessions` (open Postgres connections) as of now,
    /// plus the process's CPU, memory and open files.
    pub fn render(&self, vitals: &Vitals, pg_sessions: u64) -> String {
        metrics::with_local_recorder(&self.recorder, || {
            self.process.collect();
            record(vitals);
            gauge!("sluice_pg_sessions").set(pg_sessions as f64);
            for ((source, code), n) in self.http.snapshot() {
                counter!("sluice_http_requests_total", "source" => source, "code" => code.to_string())
                    .absolute(n);
            }
        });
        self.recorder.handle().run_upkeep();
        self.recorder.handle().render()
    }
}

/// Puts `v` into the current recorder.
fn record(v: &Vitals) {
    let now = sluice_engine::EventTime::now().micros() as f64 / 1e6;
    for (name, m, _failed) in &v.sources {
        let source = name.clone();
        counter!("sluice_source_records_total", "source" => source.clone()).absolute(m.rows_in);
        counter!("sluice_source_errors_total", "source" => source.clone()).absolute(m.bad_records);
        counter!("sluice_source_bytes_total", "source" => source.clone()).absolute(m.bytes_in);
        if !m.lag_in_millis {
            for (p, n) in &m.partition_lag {
                gauge!("sluice_source_lag_records", "source" => source.clone(), "partition" => p.to_string())
                    .set(*n as f64);
            }
        }
        let lag_seconds = m.lag_millis.map_or(0.0, |ms| ms as f64 / 1000.0);
        gauge!("sluice_source_lag_seconds", "source" => source).set(lag_seconds);
    }
    for s in &v.streams {
        let (m, stream) = (&s.metrics, s.name.clone());
        counter!("sluice_stream_rows_in_total", "stream" => stream.clone()).absolute(m.rows_in);
        counter!("sluice_stream_rows_out_total", "stream" => stream.clone()).absolute(m.rows_out);
        counter!("sluice_stream_errors_total", "stream" => stream.clone()).absolute(m.bad_records);
        counter!("sluice_stream_late_events_total", "stream" => stream.clone())
            .absolute(m.late_events);
        counter!("sluice_stream_duplicates_total", "stream" => stream.clone())
            .absolute(m.duplicates);
        // Without a watermark (no event time, or nothing read yet) there is no lag to show.
        let watermark_lag = m
            .watermark
            .map_or(0.0, |w| (now - w.micros() as f64 / 1e6).max(0.0));
        gauge!("sluice_stream_watermark_lag_seconds", "stream" => stream.clone())
            .set(watermark_lag);
        gauge!("sluice_stream_up", "stream" => stream.clone()).set(if s.failed {
            0.0
        } else {
            1.0
        });
        for (side, rows) in ["left", "right"].into_iter().zip(m.state_rows) {
            gauge!("sluice_stream_state_rows", "stream" => stream.clone(), "side" => side)
                .set(rows.max(0) as f64);
        }
        if let Some(n) = s.glue_failures {
            counter!("sluice_glue_failures_total", "stream" => stream.clone()).absolute(n);
        }
        counter!("sluice_lake_compactions_total", "stream" => stream.clone())
            .absolute(s.compactions);
        counter!("sluice_lake_compaction_failures_total", "stream" => stream.clone())
            .absolute(s.compaction_failures);
        gauge!("sluice_stream_state_bytes", "stream" => stream).set(s.state_bytes as f64);
    }
    for (name, delivered, failed) in &v.sinks {
        counter!("sluice_sink_rows_delivered_total", "sink" => name.clone()).absolute(*delivered);
        counter!("sluice_sink_errors_total", "sink" => name.clone()).absolute(u64::from(*failed));
    }
    for d in &v.checkpoint_durations {
        histogram!("sluice_checkpoint_duration_seconds").record(d.as_secs_f64());
    }
    // Before the first checkpoint: 0, so "time since" alerts fire if none ever completes.
    gauge!("sluice_checkpoint_last_completed_timestamp_seconds")
        .set(v.checkpoint_last_completed.unwrap_or(0.0));
    counter!("sluice_checkpoint_failures_total").absolute(v.checkpoint_failures);
    gauge!("sluice_checkpoint_interval_seconds")
        .set(v.checkpoint_interval.map_or(0.0, |d| d.as_secs_f64()));
    for (zone, name, files, bytes) in &v.lake {
        counter!("sluice_lake_files_committed_total", "zone" => *zone, "name" => name.clone())
            .absolute(*files);
        counter!("sluice_lake_bytes_committed_total", "zone" => *zone, "name" => name.clone())
            .absolute(*bytes);
    }
    for d in &v.lake_latencies {
        histogram!("sluice_event_to_lake_seconds").record(d.as_secs_f64());
    }
    // The histograms exist before their first observation.
    let _ = histogram!("sluice_checkpoint_duration_seconds");
    let _ = histogram!("sluice_event_to_lake_seconds");
}

/// Help texts and units, once per recorder.
fn describe() {
    describe_counter!(
        "sluice_source_records_total",
        Unit::Count,
        "Records a source read (rows published to its streams)."
    );
    describe_counter!(
        "sluice_source_errors_total",
        Unit::Count,
        "Records a source sent to the errors zone."
    );
    describe_counter!(
        "sluice_source_bytes_total",
        Unit::Bytes,
        "Bytes of the records a source received."
    );
    describe_gauge!(
        "sluice_source_lag_records",
        Unit::Count,
        "Records between a source's reader and the end of a partition."
    );
    describe_gauge!(
        "sluice_source_lag_seconds",
        Unit::Seconds,
        "How far behind the newest record a source's reader is."
    );
    describe_counter!(
        "sluice_stream_rows_in_total",
        Unit::Count,
        "Rows a stream read."
    );
    describe_counter!(
        "sluice_stream_rows_out_total",
        Unit::Count,
        "Rows a stream emitted."
    );
    describe_counter!(
        "sluice_stream_errors_total",
        Unit::Count,
        "Rows a stream sent to the errors zone."
    );
    describe_counter!(
        "sluice_stream_late_events_total",
        Unit::Count,
        "Rows that arrived behind a stream's watermark."
    );
    describe_counter!(
        "sluice_stream_duplicates_total",
        Unit::Count,
        "Rows a stream's dedup dropped."
    );
    describe_gauge!(
        "sluice_stream_watermark_lag_seconds",
        Unit::Seconds,
        "Wall clock minus a stream's watermark."
    );
    describe_gauge!(
        "sluice_stream_up",
        "1 while a stream runs (or finished), 0 once it failed."
    );
    describe_counter!(
        "sluice_glue_failures_total",
        Unit::Count,
        "Failed Glue Data Catalog calls for a stream's table (each retried)."
    );
    describe_counter!(
        "sluice_lake_compactions_total",
        Unit::Count,
        "Hour partitions of a stream compacted and marked complete (_SUCCESS)."
    );
    describe_counter!(
        "sluice_lake_compaction_failures_total",
        Unit::Count,
        "Compactions of a stream's closed hours that failed (each retried a minute later)."
    );
    describe_gauge!(
        "sluice_stream_state_rows",
        Unit::Count,
        "Rows a stream's join holds in its state, per side (left: also any one-input operator)."
    );
    describe_gauge!(
        "sluice_stream_state_bytes",
        Unit::Bytes,
        "Bytes of operator state a stream's last checkpoint wrote."
    );
    describe_histogram!(
        "sluice_checkpoint_duration_seconds",
        Unit::Seconds,
        "From a checkpoint's request to its commit."
    );
    describe_gauge!(
        "sluice_checkpoint_last_completed_timestamp_seconds",
        Unit::Seconds,
        "When the last checkpoint completed (0: none yet)."
    );
    describe_gauge!(
        "sluice_checkpoint_interval_seconds",
        Unit::Seconds,
        "How often checkpoints are taken (0: no stream takes part)."
    );
    describe_counter!(
        "sluice_checkpoint_failures_total",
        Unit::Count,
        "Checkpoints aborted (a participant did not report in time)."
    );
    describe_counter!(
        "sluice_sink_rows_delivered_total",
        Unit::Count,
        "Rows a sink delivered."
    );
    describe_counter!(
        "sluice_sink_errors_total",
        Unit::Count,
        "Times a sink failed."
    );
    describe_counter!(
        "sluice_lake_files_committed_total",
        Unit::Count,
        "Files committed to a zone of the lake."
    );
    describe_counter!(
        "sluice_lake_bytes_committed_total",
        Unit::Bytes,
        "Bytes committed to a zone of the lake."
    );
    describe_histogram!(
        "sluice_event_to_lake_seconds",
        Unit::Seconds,
        "From a row reaching the lake writer to the commit of its file."
    );
    describe_counter!(
        "sluice_http_requests_total",
        Unit::Count,
        "HTTP ingest answers, by source and status code."
    );
    describe_gauge!(
        "sluice_pg_sessions",
        Unit::Count,
        "Open Postgres connections."
    );
}
