//! The ingest stage every source reader shares, from what a transport received to what the
//! streams read:
//!
//! ```text
//!  records ─► raw zone ─► decode (RecordFormat) ─► errors zone ─► metadata columns
//!          ─► event time per split ─► publish ─► watermark (SourceClock)
//! ```
//!
//! A transport hands over one batch of records at a time as a [`Received`]: each record's
//! value (or none: a Kafka tombstone), split, origin (for the errors zone) and metadata
//! (`_kafka_offset`, `_kinesis_shard_id`, …). [`Ingest`] does the rest the same way for every
//! connector, so a format, a metadata column or an idle split behaves alike on every
//! transport.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef};
use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use sluice_engine::{BadRecord, EngineError, SourceContext};

use crate::formats::{Decoded, Decoder, RecordError, RecordFormat, bad_record};
use crate::lake::RecordZone;
use crate::split_clock::{ClockState, SourceClock, event_times};

/// One batch of records as a transport received them.
pub trait Received {
    /// What a record's split is keyed by (a partition number, a shard id, [`crate::split_clock::OneSplit`]).
    type Split: Ord + Clone;

    /// How many records.
    fn len(&self) -> usize;

    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Record `i`'s value; `None` when it has none (it is rejected).
    fn value(&self, i: usize) -> Option<&[u8]>;

    /// Record `i`'s split.
    fn split(&self, i: usize) -> &Self::Split;

    /// Every split that delivered in this batch, also those whose records all failed: they
    /// were heard from (idleness) even so.
    fn splits(&self) -> Vec<Self::Split>;

    /// Where record `i` came from, for the errors zone (`kafka topic t partition 0 offset 7`).
    fn origin(&self, i: usize) -> String;

    /// The metadata column `name` for `records` (indices of this batch), or `None` when
    /// `name` is not one of the connector's.
    fn metadata(&self, name: &str, records: &[usize]) -> Option<ArrayRef> {
        let _ = (name, records);
        None
    }
}

/// Numbered lines of one request or file, from a source with one split (an HTTP body's
/// records, a landed file's lines): `(line number, record)` pairs; `origin` names the
/// request or file in the errors zone ("… line n").
#[derive(Debug)]
pub struct Lines<'a> {
    /// The records and their line numbers.
    pub records: &'a [(usize, &'a [u8])],
    /// The request or file they came from.
    pub origin: &'a str,
}

impl Received for Lines<'_> {
    type Split = crate::split_clock::OneSplit;

    fn len(&self) -> usize {
        self.records.len()
    }

    fn value(&self, i: usize) -> Option<&[u8]> {
        Some(self.records[i].1)
    }

    fn split(&self, _: usize) -> &crate::split_clock::OneSplit {
        &crate::split_clock::OneSplit
    }

    fn splits(&self) -> Vec<crate::split_clock::OneSplit> {
        vec![crate::split_clock::OneSplit]
    }

    fn origin(&self, i: usize) -> String {
        format!("{} line {}", self.origin, self.records[i].0)
    }
}

/// Where a reader's rejected records go.
#[derive(Debug)]
pub enum Rejects {
    /// Written to this errors zone by the reader itself (staged when it checkpoints).
    Zone(Box<RecordZone>),
    /// Handed to the source's errors writer ([`SourceContext::bad_records`]).
    Context,
    /// Not reported: another reader of the same records reports them (a backfill reader
    /// re-reads what the source's shared reader read).
    Ignored,
}

/// The ingest stage of one reader. See the module docs.
#[derive(Debug)]
pub struct Ingest<K: Ord> {
    /// "kafka source `orders`", for errors.
    owner: String,
    /// The source's declared columns.
    schema: SchemaRef,
    /// Whether every declared column is decoded (no metadata columns).
    decoded_only: bool,
    /// Whether records are binary (kept as base64 in the errors zone).
    binary: bool,
    decoder: Decoder,
    /// Where every record is archived as received, when the source keeps its raw zone.
    raw: Option<RecordZone>,
    rejects: Rejects,
    clock: SourceClock<K>,
}

/// What became of one batch.
#[derive(Debug, Default)]
pub struct Ingested {
    /// Rows published.
    pub rows: usize,
    /// Records rejected (index in the batch, why), in index order.
    pub rejected: Vec<RecordError>,
}

impl<K: Ord + Clone> Ingest<K> {
    /// The stage of a source of `schema` whose records are in `format`; the columns whose
    /// names start with `metadata_prefix` are metadata (the rest are decoded from values).
    /// Rejected records go to the context's errors writer until [`Self::with_rejects`].
    pub fn new(
        owner: impl Into<String>,
        format: &RecordFormat,
        schema: SchemaRef,
        metadata_prefix: Option<&str>,
    ) -> crate::Result<Self> {
        let values: Vec<_> = schema
            .fields()
            .iter()
            .filter(|f| metadata_prefix.is_none_or(|p| !f.name().starts_with(p)))
            .cloned()
            .collect();
        let decoded_only = values.len() == schema.fields().len();
        let decoder = Decoder::new(format, Arc::new(Schema::new(values)))?;
        Ok(Self {
            owner: owner.into(),
            schema,
            decoded_only,
            binary: format.is_binary(),
            decoder,
            raw: None,
            rejects: Rejects::Context,
            clock: SourceClock::default(),
        })
    }

    /// Archives every record in `raw` before decoding it.
    pub fn with_raw(mut self, raw: Option<RecordZone>) -> Self {
        self.raw = raw;
        self
    }

    /// Sends rejected records where `rejects` says.
    pub fn with_rejects(mut self, rejects: Rejects) -> Self {
        self.rejects = rejects;
        self
    }

    /// Decodes with `decoder` from now on (a CSV file's, made from its header).
    pub fn set_decoder(&mut self, decoder: Decoder) {
        self.decoder = decoder;
    }

    /// The reader's event time ([`SourceClock`]): splits come and go through it.
    pub fn clock(&mut self) -> &mut SourceClock<K> {
        &mut self.clock
    }

    /// The files staged in the raw and errors zones since the last call (for a checkpoint).
    pub fn take_staged(&self) -> Vec<sluice_engine::checkpoint::StagedFile> {
        let errors = match &self.rejects {
            Rejects::Zone(z) => Some(z.as_ref()),
            _ => None,
        };
        [self.raw.as_ref(), errors]
            .into_iter()
            .flatten()
            .flat_map(RecordZone::take_staged)
            .collect()
    }

    fn failed(&self, what: impl std::fmt::Display) -> EngineError {
        EngineError::external(self.owner.clone(), std::io::Error::other(what.to_string()))
    }

    /// Takes `batch` through every step: archived, decoded, its bad records reported, its
    /// rows (with metadata columns) published, the watermark advanced.
    pub async fn ingest<R: Received<Split = K>>(
        &mut self,
        ctx: &SourceContext,
        batch: &R,
    ) -> sluice_engine::Result<Ingested> {
        self.run(ctx, batch, true).await
    }

    /// [`Self::ingest`] of a batch taken through the stage before a restart (replayed from
    /// the raw zone): archived and rejected then, published again now.
    pub async fn reingest<R: Received<Split = K>>(
        &mut self,
        ctx: &SourceContext,
        batch: &R,
    ) -> sluice_engine::Result<Ingested> {
        self.run(ctx, batch, false).await
    }

    async fn run<R: Received<Split = K>>(
        &mut self,
        ctx: &SourceContext,
        batch: &R,
        first_time: bool,
    ) -> sluice_engine::Result<Ingested> {
        if batch.is_empty() {
            return Ok(Ingested::default());
        }
        if first_time {
            let bytes = (0..batch.len()).map(|i| batch.value(i).map_or(0, <[u8]>::len));
            ctx.metrics.add_bytes_in(bytes.sum());
        }
        if let Some(raw) = self.raw.as_ref().filter(|_| first_time) {
            let values = (0..batch.len()).map(|i| batch.value(i).unwrap_or_default());
            raw.put_values(values, self.binary)
                .await
                .map_err(|e| self.failed(format!("raw zone: {e}")))?;
        }
        let (rows, good, rejected) = self.decode(batch).await?;
        if first_time {
            self.reject(ctx, batch, &rejected).await?;
        }
        let published = rows.num_rows();
        let latest = latest_event_times(ctx, &rows, batch, &good);
        self.clock.publish(ctx, rows, latest).await;
        Ok(Ingested {
            rows: published,
            rejected,
        })
    }

    /// Decodes `batch` without side effects: the records it would reject, with why.
    pub async fn check<R: Received<Split = K>>(
        &mut self,
        batch: &R,
    ) -> sluice_engine::Result<Ingested> {
        let (rows, _, rejected) = self.decode(batch).await?;
        Ok(Ingested {
            rows: rows.num_rows(),
            rejected,
        })
    }

    /// Publishes rows that needed no decoding (a Parquet file's, fitted to the schema) from
    /// `split`.
    pub async fn publish_rows(&mut self, ctx: &SourceContext, split: K, rows: RecordBatch) {
        let max = event_times(ctx, &rows).and_then(arrow::compute::max);
        self.clock.publish(ctx, rows, [(split, max)]).await;
    }

    /// Reports records rejected before they reached the decoder (an unreadable file, a
    /// body that does not split into records), counted as bad records.
    pub async fn reject_records(
        &self,
        ctx: &SourceContext,
        bad: Vec<BadRecord>,
    ) -> sluice_engine::Result<()> {
        if bad.is_empty() {
            return Ok(());
        }
        match &self.rejects {
            Rejects::Ignored => return Ok(()),
            Rejects::Zone(errors) => {
                errors
                    .put_bad_records(&bad)
                    .await
                    .map_err(|e| self.failed(format!("errors zone: {e}")))?;
                ctx.metrics.add_bad_records(bad.len());
            }
            Rejects::Context => {
                ctx.metrics.add_bad_records(bad.len());
                // The errors writer only goes away at shutdown.
                let _ = ctx.bad_records.send(bad).await;
            }
        }
        Ok(())
    }

    /// The rows of `batch`'s good records in the declared schema, those records' indices,
    /// and the rejected ones.
    async fn decode<R: Received<Split = K>>(
        &mut self,
        batch: &R,
    ) -> sluice_engine::Result<(RecordBatch, Vec<usize>, Vec<RecordError>)> {
        let mut rejected = Vec::new();
        let mut values: Vec<&[u8]> = Vec::with_capacity(batch.len());
        let mut decoded_from: Vec<usize> = Vec::with_capacity(batch.len());
        for i in 0..batch.len() {
            match batch.value(i) {
                Some(v) => {
                    values.push(v);
                    decoded_from.push(i);
                }
                None => rejected.push(RecordError {
                    index: i,
                    reason: "the record has no value (a tombstone)".into(),
                }),
            }
        }
        let Decoded {
            batch: decoded,
            errors,
        } = self
            .decoder
            .decode(&values)
            .await
            .map_err(|e| self.failed(e))?;
        let good: Vec<usize> = if errors.is_empty() {
            decoded_from
        } else {
            let mut failed = vec![false; values.len()];
            for e in errors {
                failed[e.index] = true;
                rejected.push(RecordError {
                    index: decoded_from[e.index],
                    reason: e.reason,
                });
            }
            rejected.sort_by_key(|e| e.index);
            decoded_from
                .into_iter()
                .zip(failed)
                .filter(|(_, f)| !f)
                .map(|(i, _)| i)
                .collect()
        };
        let rows = if self.decoded_only {
            RecordBatch::try_new(Arc::clone(&self.schema), decoded.columns().to_vec())?
        } else {
            crate::formats::with_metadata_columns(&self.schema, decoded, |name| {
                batch.metadata(name, &good)
            })?
        };
        Ok((rows, good, rejected))
    }

    /// Reports `rejected` records of `batch` (see [`Rejects`]).
    async fn reject<R: Received<Split = K>>(
        &self,
        ctx: &SourceContext,
        batch: &R,
        rejected: &[RecordError],
    ) -> sluice_engine::Result<()> {
        if rejected.is_empty() || matches!(self.rejects, Rejects::Ignored) {
            return Ok(());
        }
        let bad = rejected
            .iter()
            .map(|e| {
                bad_record(
                    batch.value(e.index).unwrap_or_default(),
                    self.binary,
                    e.reason.clone(),
                    batch.origin(e.index),
                )
            })
            .collect();
        self.reject_records(ctx, bad).await
    }
}

impl<K: Ord + Clone + ToString + std::str::FromStr> Ingest<K> {
    /// Its event time, as a checkpoint keeps it.
    pub fn clock_state(&self) -> ClockState {
        self.clock.state()
    }
}

/// Per split that delivered in `batch`, the largest event time among its `rows` (the rows of
/// records `good`, in order).
fn latest_event_times<R: Received>(
    ctx: &SourceContext,
    rows: &RecordBatch,
    batch: &R,
    good: &[usize],
) -> Vec<(R::Split, Option<i64>)> {
    let mut latest: Vec<(R::Split, Option<i64>)> =
        batch.splits().into_iter().map(|s| (s, None)).collect();
    let Some(ts) = event_times(ctx, rows) else {
        return latest;
    };
    // Rows come in runs of one split: find its slot once per run.
    let mut slot = 0;
    for (row, &i) in good.iter().enumerate() {
        if !ts.is_valid(row) {
            continue;
        }
        let split = batch.split(i);
        if latest.get(slot).is_none_or(|(s, _)| s != split) {
            match latest.iter().position(|(s, _)| s == split) {
                Some(p) => slot = p,
                None => {
                    latest.push((split.clone(), None));
                    slot = latest.len() - 1;
                }
            }
        }
        let m = &mut latest[slot].1;
        *m = Some(m.map_or(ts.value(row), |m| m.max(ts.value(row))));
    }
    latest
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int32Array, Int64Array, TimestampMicrosecondArray};
    use arrow::datatypes::{DataType, Field, TimeUnit};
    use sluice_engine::source::WatermarkSpec;
    use sluice_engine::{FanOut, Message};

    use super::*;

    /// Records of two splits: `(split, value)`.
    struct Batch(Vec<(i32, Option<&'static str>)>);

    impl Received for Batch {
        type Split = i32;

        fn len(&self) -> usize {
            self.0.len()
        }

        fn value(&self, i: usize) -> Option<&[u8]> {
            self.0[i].1.map(str::as_bytes)
        }

        fn split(&self, i: usize) -> &i32 {
            &self.0[i].0
        }

        fn splits(&self) -> Vec<i32> {
            let mut s: Vec<i32> = self.0.iter().map(|r| r.0).collect();
            s.dedup();
            s
        }

        fn origin(&self, i: usize) -> String {
            format!("record {i}")
        }

        fn metadata(&self, name: &str, records: &[usize]) -> Option<ArrayRef> {
            (name == "_t_split").then(|| {
                Arc::new(Int32Array::from_iter_values(
                    records.iter().map(|&i| self.0[i].0),
                )) as ArrayRef
            })
        }
    }

    #[tokio::test]
    async fn every_record_is_published_or_rejected_and_the_slowest_split_holds_the_watermark() {
        let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("ts", ts, false),
            Field::new("_t_split", DataType::Int32, false),
        ]));
        let (bad_tx, mut bad_rx) = tokio::sync::mpsc::channel(4);
        let output = FanOut::new("t");
        let mut rx = output.subscribe(16);
        let ctx = SourceContext {
            output,
            metrics: Arc::default(),
            bad_records: bad_tx,
            cancel: Default::default(),
            watermark: Some(WatermarkSpec {
                column: "ts".into(),
                delay_micros: 10,
                idle_timeout: None,
            }),
            checkpoint: None,
        };
        let mut ingest: Ingest<i32> =
            Ingest::new("t", &RecordFormat::Json, schema, Some("_t_")).unwrap();
        ingest.clock().add(0);
        ingest.clock().add(1);
        let batch = Batch(vec![
            (0, Some(r#"{"id": 1, "ts": 100}"#)),
            (0, None),
            (0, Some(r#"{"id": "x", "ts": 200}"#)),
            (1, Some(r#"{"id": 2, "ts": 50}"#)),
            (1, Some(r#"{"id": 3, "ts": 70}"#)),
        ]);
        let done = ingest.ingest(&ctx, &batch).await.unwrap();
        assert_eq!(done.rows, 3);
        let rejected: Vec<usize> = done.rejected.iter().map(|e| e.index).collect();
        assert_eq!(rejected, [1, 2]);
        assert!(done.rejected[0].reason.contains("tombstone"));
        let bad = bad_rx.recv().await.unwrap();
        let origins: Vec<&str> = bad.iter().map(|b| b.origin.as_str()).collect();
        assert_eq!(origins, ["record 1", "record 2"]);
        let Some(Message::Data(rows)) = rx.recv().await else {
            panic!("rows first")
        };
        let ids = rows
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert_eq!(ids.values(), &[1, 2, 3]);
        let splits = rows
            .column(2)
            .as_any()
            .downcast_ref::<Int32Array>()
            .unwrap();
        assert_eq!(splits.values(), &[0, 1, 1], "metadata of the good records");
        let stamps = rows.column(1);
        assert!(stamps.as_any().is::<TimestampMicrosecondArray>());
        // min(100, 70) - 10: split 1 is behind.
        match rx.recv().await {
            Some(Message::Watermark(t)) => assert_eq!(t.0, 60),
            other => panic!("a watermark, not {other:?}"),
        }
        let state = ingest.clock_state();
        assert_eq!(state.splits.get("0"), Some(&100));
        assert_eq!(state.splits.get("1"), Some(&70));
        assert_eq!(state.emitted, Some(60));
    }
}
