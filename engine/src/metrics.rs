//! Counters shared between a running pipeline and whoever reports on it (`SHOW …`, `/metrics`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::time::EventTime;

/// Live counters of one source or stream. Cheap to update from the hot path (relaxed atomics,
/// one update per batch, never per row).
#[derive(Debug)]
pub struct Metrics {
    rows_in: AtomicU64,
    rows_out: AtomicU64,
    bytes_in: AtomicU64,
    bad_records: AtomicU64,
    batches: AtomicU64,
    late_events: AtomicU64,
    duplicates: AtomicU64,
    /// Rows held in operator state, over every subtask, per input side.
    state_rows: [AtomicI64; 2],
    last_event_time: AtomicI64,
    watermark: AtomicI64,
    /// How far behind the newest record a source's reader is, in ms; `i64::MIN`: unknown.
    lag_millis: AtomicI64,
    /// Consumer lag per partition (messages behind the high watermark), for sources that
    /// read partitioned logs; empty when unknown.
    partition_lag: std::sync::Mutex<Vec<(i32, i64)>>,
    /// Whether `partition_lag` is in milliseconds (Kinesis shards) rather than records.
    lag_in_millis: std::sync::atomic::AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            rows_in: AtomicU64::new(0),
            rows_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bad_records: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            late_events: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            state_rows: [AtomicI64::new(0), AtomicI64::new(0)],
            last_event_time: AtomicI64::new(i64::MIN),
            watermark: AtomicI64::new(i64::MIN),
            lag_millis: AtomicI64::new(i64::MIN),
            partition_lag: std::sync::Mutex::default(),
            lag_in_millis: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// A point-in-time copy of [`Metrics`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Rows received.
    pub rows_in: u64,
    /// Rows emitted.
    pub rows_out: u64,
    /// Bytes of the records a source received (their values, as the transport delivered
    /// them).
    pub bytes_in: u64,
    /// Records sent to the errors zone.
    pub bad_records: u64,
    /// Batches processed.
    pub batches: u64,
    /// Rows that arrived behind the watermark (in the errors zone, or dropped when the stream
    /// says `late_events = 'drop'`).
    pub late_events: u64,
    /// Rows dropped by a dedup because their key was seen before.
    pub duplicates: u64,
    /// Rows held in operator state now, per input side (a join's stored rows of its left
    /// and right sides).
    pub state_rows: [i64; 2],
    /// The largest event time seen, if any.
    pub last_event_time: Option<EventTime>,
    /// The current watermark, if any was emitted.
    pub watermark: Option<EventTime>,
    /// How far behind the newest record the source's reader is, in ms, where it knows.
    pub lag_millis: Option<i64>,
    /// Consumer lag per partition, where the source reports it.
    pub partition_lag: Vec<(i32, i64)>,
    /// Whether `partition_lag` is in milliseconds behind the newest record (Kinesis
    /// shards), not in records.
    pub lag_in_millis: bool,
}

impl Metrics {
    /// Counts rows received.
    pub fn add_rows_in(&self, n: usize) {
        self.rows_in.fetch_add(n as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts rows emitted.
    pub fn add_rows_out(&self, n: usize) {
        self.rows_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts bytes a source received.
    pub fn add_bytes_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Records how far behind the newest record the reader is, in ms (Kinesis'
    /// `MillisBehindLatest`, or now minus the last record's timestamp).
    pub fn set_lag_millis(&self, ms: i64) {
        self.lag_millis.store(ms.max(0), Ordering::Relaxed);
    }

    /// Counts records sent to the errors zone.
    pub fn add_bad_records(&self, n: usize) {
        self.bad_records.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Records the consumer lag of every partition (replacing the previous report).
    pub fn set_partition_lag(&self, lag: Vec<(i32, i64)>) {
        *self.partition_lag.lock().unwrap_or_else(|e| e.into_inner()) = lag;
    }

    /// Records how far behind the newest record each shard's reader is, in ms (replacing
    /// the previous report); the source's lag is the largest.
    pub fn set_shard_lag_millis(&self, lag: Vec<(i32, i64)>) {
        self.set_lag_millis(lag.iter().map(|(_, ms)| *ms).max().unwrap_or(0));
        self.lag_in_millis.store(true, Ordering::Relaxed);
        self.set_partition_lag(lag);
    }

    /// Adds what the operators counted.
    pub fn add_operator_counts(&self, c: crate::operator::OperatorCounts) {
        if c.late > 0 {
            self.late_events.fetch_add(c.late, Ordering::Relaxed);
        }
        if c.duplicates > 0 {
            self.duplicates.fetch_add(c.duplicates, Ordering::Relaxed);
        }
        for (held, n) in self.state_rows.iter().zip(c.state_rows) {
            if n != 0 {
                held.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Records an event time seen; keeps the maximum.
    pub fn observe_event_time(&self, t: EventTime) {
        self.last_event_time.fetch_max(t.0, Ordering::Relaxed);
    }

    /// Records the current watermark; keeps the maximum.
    pub fn observe_watermark(&self, t: EventTime) {
        self.watermark.fetch_max(t.0, Ordering::Relaxed);
    }

    /// The counters a checkpoint keeps, by name (see [`Metrics::restore_counters`]).
    pub fn counters(&self) -> std::collections::BTreeMap<String, i64> {
        let s = self.snapshot();
        let mut c: std::collections::BTreeMap<String, i64> = [
            ("rows_in", s.rows_in),
            ("rows_out", s.rows_out),
            ("bytes_in", s.bytes_in),
            ("bad_records", s.bad_records),
            ("batches", s.batches),
            ("late_events", s.late_events),
            ("duplicates", s.duplicates),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), i64::try_from(v).unwrap_or(i64::MAX)))
        .collect();
        for (k, v) in [
            ("last_event_time", s.last_event_time),
            ("watermark", s.watermark),
        ] {
            if let Some(t) = v {
                c.insert(k.to_string(), t.0);
            }
        }
        c
    }

    /// Carries counters over from a checkpoint ([`Metrics::counters`]): a restarted
    /// pipeline goes on counting where its last checkpoint was. Unknown names are ignored.
    pub fn restore_counters(&self, counters: &std::collections::BTreeMap<String, i64>) {
        for (name, v) in counters {
            let n = u64::try_from(*v).unwrap_or(0);
            match name.as_str() {
                "rows_in" => self.rows_in.fetch_add(n, Ordering::Relaxed),
                "rows_out" => self.rows_out.fetch_add(n, Ordering::Relaxed),
                "bytes_in" => self.bytes_in.fetch_add(n, Ordering::Relaxed),
                "bad_records" => self.bad_records.fetch_add(n, Ordering::Relaxed),
                "batches" => self.batches.fetch_add(n, Ordering::Relaxed),
                "late_events" => self.late_events.fetch_add(n, Ordering::Relaxed),
                "duplicates" => self.duplicates.fetch_add(n, Ordering::Relaxed),
                "last_event_time" => {
                    self.observe_event_time(EventTime(*v));
                    continue;
                }
                "watermark" => {
                    self.observe_watermark(EventTime(*v));
                    continue;
                }
                _ => continue,
            };
        }
    }

    /// Reads all counters.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let opt = |v: i64| (v != i64::MIN).then_some(EventTime(v));
        MetricsSnapshot {
            rows_in: self.rows_in.load(Ordering::Relaxed),
            rows_out: self.rows_out.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bad_records: self.bad_records.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            late_events: self.late_events.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            state_rows: [
                self.state_rows[0].load(Ordering::Relaxed),
                self.state_rows[1].load(Ordering::Relaxed),
            ],
            last_event_time: opt(self.last_event_time.load(Ordering::Relaxed)),
            watermark: opt(self.watermark.load(Ordering::Relaxed)),
            lag_millis: Some(self.lag_millis.load(Ordering::Relaxed)).filter(|v| *v != i64::MIN),
            partition_lag: self
                .partition_lag
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            lag_in_millis: self.lag_in_millis.load(Ordering::Relaxed),
        }
    }
}
