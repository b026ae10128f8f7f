//! `http`: push ingestion, the way API Gateway fronted one stream per entity type.
//!
//! ```sql
//! CREATE SOURCE orders (order_id TEXT NOT NULL, amount DOUBLE, ts TIMESTAMP NOT NULL)
//! WITH (connector = 'http');
//! ```
//! Clients `POST /v1/sources/orders/events` with NDJSON (one object per line) or a JSON
//! array. For each request, in this order:
//! 1. the body is stored as received under `raw/<source>/…` (durable before anything else);
//! 2. each record is decoded against the declared schema ([`crate::ingest::Ingest`]);
//! 3. records that fail are stored under `errors/<source>/…` with their line and reason;
//! 4. the good records are published to the streams reading the source.
//!
//! Only then is the request answered, so an acknowledged record is in the lake. Requests to
//! one source are taken one at a time, each numbered (the number is in its raw file's name);
//! a checkpoint records the last number published, and after a crash the source publishes
//! again the raw files numbered after it — so an acknowledged record is never lost, and, for
//! streams that checkpoint, lands exactly once. Good records
//! of a body with bad ones are kept (the client is told which lines failed and why, and can
//! resend just those); the alternative — rejecting the whole body — would make one bad line
//! hold back every good one.
//!
//! A request may carry an `Idempotency-Key` header: retried with the same key within the
//! source's `idempotency_window`, it is answered as the first time and its body is stored
//! once (see [`idempotency`]).
//!
//! Records go through the ingest stage every source shares ([`crate::ingest`]): the same
//! decoding, errors-zone records and watermark as a Kafka topic's.
//!
//! Options: `max_request_size` (default `'10MB'`; larger bodies get 413), `format`
//! (`'json'`, the default and for now the only one: request bodies are JSON) and
//! `idempotency_window` (default `'24 hours'`).

mod connector;
pub mod idempotency;

use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use serde_json::value::RawValue;
use sluice_engine::checkpoint::ReaderCheckpoint;
use sluice_engine::{SourceContext, WithOptions};

use crate::error::{ConnectorError, Result};
use crate::formats::{RecordFormat, bad_record, take_format};
use crate::ingest::{Ingest, Lines, Rejects};
use crate::lake::{Lake, MICROS_PER_HOUR, RecordZone, Zone};
use crate::split_clock::{ClockState, OneSplit, resend_watermark};

/// Validated options of an `http` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// How records are encoded.
    pub format: RecordFormat,
    /// Largest accepted request body, in bytes.
    pub max_request_size: u64,
    /// How long an `Idempotency-Key` counts.
    pub idempotency_window: std::time::Duration,
}

impl HttpConfig {
    /// Takes the `http` options from `opts`.
    pub fn try_new(opts: &mut WithOptions) -> Result<Self> {
        let format = take_format(opts, &["json"])?;
        let max_request_size = opts.take_bytes("max_request_size")?.unwrap_or(10 << 20);
        let idempotency_window = opts
            .take_duration("idempotency_window")?
            .unwrap_or(std::time::Duration::from_secs(24 * 3600));
        Ok(Self {
            format,
            max_request_size,
            idempotency_window,
        })
    }
}

pub use connector::HttpConnector;
pub use sluice_engine::push::{IngestError, IngestReport, RejectedLine};

/// The receiving end of one `http` source.
#[derive(Debug)]
pub struct HttpIngest {
    name: String,
    raw: RecordZone,
    ctx: SourceContext,
    state: tokio::sync::Mutex<IngestState>,
    config: HttpConfig,
    markers: idempotency::Markers,
}

/// What requests are serialised on.
#[derive(Debug)]
struct IngestState {
    /// Decoding, the errors zone, event time.
    ingest: Ingest<OneSplit>,
    /// The number of the last request stored.
    seq: u64,
    /// The number of this server's first request (bodies before it were replayed at start).
    first_of_run: Option<u64>,
    /// When expired idempotency markers were last swept, µs.
    swept_at: i64,
}

impl HttpIngest {
    /// The ingest endpoint of source `name` with `schema`.
    pub fn new(
        name: impl Into<String>,
        schema: SchemaRef,
        config: HttpConfig,
        lake: Lake,
        ctx: SourceContext,
    ) -> Result<Self> {
        let name = name.into();
        // Bad records are in the errors zone before the request is answered.
        let errors = RecordZone::new(lake.clone(), Zone::Errors, name.clone());
        let mut ingest = Ingest::new(
            format!("http source `{name}`"),
            &config.format,
            schema,
            None,
        )?
        .with_rejects(Rejects::Zone(Box::new(errors)));
        ingest.clock().add(OneSplit);
        Ok(Self {
            raw: RecordZone::new(lake.clone(), Zone::Raw, name.clone()),
            markers: idempotency::Markers::new(lake, &name, config.idempotency_window),
            name,
            ctx,
            state: tokio::sync::Mutex::new(IngestState {
                ingest,
                seq: 0,
                first_of_run: None,
                swept_at: 0,
            }),
            config,
        })
    }

    /// Takes part in checkpoints: between two requests, sends each requested barrier with
    /// the position `{"seq": last request published, "at": µs now, "event_time": …}` (the
    /// event time as [`ClockState`] keeps it). Runs until the source is stopped.
    pub fn checkpoint(self: &std::sync::Arc<Self>, mut ck: ReaderCheckpoint) {
        let this = std::sync::Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let epoch = tokio::select! {
                    _ = this.ctx.cancel.cancelled() => return,
                    e = ck.requested() => e,
                };
                let st = this.state.lock().await;
                let mut position = serde_json::json!({
                    "seq": st.seq,
                    "at": sluice_engine::EventTime::now().micros(),
                });
                st.ingest.clock_state().write_into(&mut position);
                ck.barrier(&this.ctx.output, epoch, position).await;
            }
        });
    }

    /// Publishes again what was stored after `position` (from a checkpoint) and continues
    /// numbering after it. Call before the source takes requests.
    pub async fn replay(&self, position: &serde_json::Value) -> Result<usize> {
        let bad = || {
            ConnectorError::Engine(sluice_engine::EngineError::Checkpoint(format!(
                "http source `{}`: position {position} is not {{\"seq\": n, \"at\": µs}}",
                self.name
            )))
        };
        let after = position
            .get("seq")
            .and_then(|v| v.as_u64())
            .ok_or_else(bad)?;
        // `at` (when the position was taken) bounds what must be listed: an hour of margin
        // for clocks that differ between machines. Without it, everything is.
        let since = position
            .get("at")
            .and_then(|v| v.as_i64())
            .map(|at| at - MICROS_PER_HOUR);
        let mut st = self.state.lock().await;
        st.seq = st.seq.max(after);
        // Event time as it was at the checkpoint: its watermark goes out again at once, so
        // the streams emit what it allowed even if no request ever comes again.
        let clock = clock_at(position).ok_or_else(bad)?;
        st.ingest.clock().restore(&clock);
        resend_watermark(&self.ctx, clock.emitted).await;
        let files = self.raw.sequenced_since(since).await?;
        let mut replayed = 0;
        for (seq, path) in files.into_iter().filter(|(seq, _)| *seq > after) {
            let Some(body) = self.raw.lake().get_opt(&path).await? else {
                continue;
            };
            let is_array = body.trim_ascii_start().starts_with(b"[");
            // Records that failed went to the errors zone when the request came.
            if let Ok(records) = split_records(&body, is_array) {
                let received = Lines {
                    records: &records,
                    origin: "",
                };
                replayed += st.ingest.reingest(&self.ctx, &received).await?.rows;
            }
            st.seq = st.seq.max(seq);
        }
        tracing::info!(source = %self.name, after, replayed, "http: replayed what followed the checkpoint");
        Ok(replayed)
    }

    /// The largest body this source accepts.
    pub fn max_request_size(&self) -> u64 {
        self.config.max_request_size
    }

    /// Stores, validates and publishes one request body. `origin` describes the request in
    /// errors-zone records; `key` is its `Idempotency-Key`, if it has one. See the module
    /// docs for the order of steps.
    pub async fn ingest(
        &self,
        body: Bytes,
        origin: &str,
        key: Option<&str>,
    ) -> Result<IngestReport, IngestError> {
        use idempotency::{MAX_KEY_BYTES, Marker, Outcome};
        if let Some(k) = key
            && (k.is_empty() || k.len() > MAX_KEY_BYTES)
        {
            return Err(IngestError::BadKey(format!(
                "an Idempotency-Key is 1 to {MAX_KEY_BYTES} bytes"
            )));
        }
        let mut st = self.state.lock().await;
        let next = st.seq + 1;
        let first_of_run = *st.first_of_run.get_or_insert(next);
        let now = sluice_engine::EventTime::now().micros();
        self.sweep_markers(&mut st, now);
        if let Some(k) = key
            && let Some(marker) = self.markers.get(k, now).await?
        {
            match marker.outcome {
                Some(Outcome::Ingested(report)) => return Ok(report),
                Some(Outcome::Malformed(reason)) => return Err(IngestError::Malformed(reason)),
                None => {
                    if let Some(stored) = self.stored_body(marker.seq, marker.at).await? {
                        // Stored by an attempt that did not finish: replayed at start if
                        // that was before this server; otherwise finished now.
                        let finish = marker.seq >= first_of_run;
                        let outcome = self.process(&mut st, &stored, origin, finish).await;
                        return self.remember(k, marker, outcome).await;
                    }
                }
            }
        }
        let is_array = body.trim_ascii_start().starts_with(b"[");
        let seq = st.seq + 1;
        let marker = Marker {
            seq,
            at: now,
            outcome: None,
        };
        if let Some(k) = key {
            self.markers.put(k, &marker).await?;
        }
        self.raw
            .put_sequenced(body.clone(), seq, if is_array { "json" } else { "ndjson" })
            .await?;
        st.seq = seq;
        let outcome = self.process(&mut st, &body, origin, true).await;
        match key {
            Some(k) => self.remember(k, marker, outcome).await,
            None => outcome,
        }
    }

    /// Completes `key`'s marker with `outcome` (unless the lake failed: a retry may do
    /// better), and hands the outcome back.
    async fn remember(
        &self,
        key: &str,
        mut marker: idempotency::Marker,
        outcome: Result<IngestReport, IngestError>,
    ) -> Result<IngestReport, IngestError> {
        use idempotency::Outcome;
        marker.outcome = match &outcome {
            Ok(report) => Some(Outcome::Ingested(report.clone())),
            Err(IngestError::Malformed(reason)) => Some(Outcome::Malformed(reason.clone())),
            Err(_) => None,
        };
        if marker.outcome.is_some() {
            self.markers.put(key, &marker).await?;
        }
        outcome
    }

    /// The body stored as request `seq` around `at` (µs), if it is in the raw zone.
    async fn stored_body(&self, seq: u64, at: i64) -> Result<Option<Bytes>> {
        let files = self.raw.sequenced_since(Some(at - MICROS_PER_HOUR)).await?;
        match files.into_iter().find(|(s, _)| *s == seq) {
            Some((_, path)) => self.raw.lake().get_opt(&path).await,
            None => Ok(None),
        }
    }

    /// Deletes expired idempotency markers in the background, at most once an hour.
    fn sweep_markers(&self, st: &mut IngestState, now: i64) {
        if now - st.swept_at < MICROS_PER_HOUR {
            return;
        }
        st.swept_at = now;
        let markers = self.markers.clone();
        let source = self.name.clone();
        tokio::spawn(async move {
            match markers.sweep(now).await {
                Ok(n) if n > 0 => {
                    tracing::debug!(%source, n, "http: expired idempotency keys deleted")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(%source, error = %e, "http: cannot sweep idempotency keys")
                }
            }
        });
    }

    /// Splits, validates and (when `publish`) stores the bad records of and publishes one
    /// stored body; its report. Without `publish` only the answer is worked out.
    async fn process(
        &self,
        st: &mut IngestState,
        body: &Bytes,
        origin: &str,
        publish_rows: bool,
    ) -> Result<IngestReport, IngestError> {
        let is_array = body.trim_ascii_start().starts_with(b"[");
        let records = match split_records(body, is_array) {
            Ok(r) if !r.is_empty() => r,
            Ok(_) => return Err(IngestError::Malformed("the body holds no records".into())),
            Err(reason) => {
                if publish_rows {
                    let bad = bad_record(body, false, reason.clone(), origin.to_string());
                    st.ingest.reject_records(&self.ctx, vec![bad]).await?;
                }
                return Err(IngestError::Malformed(reason));
            }
        };
        let received = Lines {
            records: &records,
            origin,
        };
        let ingested = if publish_rows {
            st.ingest.ingest(&self.ctx, &received).await?
        } else {
            st.ingest.check(&received).await?
        };
        let rejected = ingested
            .rejected
            .into_iter()
            .map(|e| RejectedLine {
                line: records[e.index].0,
                reason: e.reason,
            })
            .collect::<Vec<_>>();
        tracing::debug!(source = %self.name, accepted = ingested.rows, rejected = rejected.len(), "ingested");
        Ok(IngestReport {
            accepted: ingested.rows,
            rejected,
        })
    }
}

/// The event time in a checkpointed position: `event_time` ([`ClockState`]), or the
/// `max_event_time` and `watermark` of positions written before it.
fn clock_at(position: &serde_json::Value) -> Option<ClockState> {
    if position.get("event_time").is_some() {
        return ClockState::read_from(position);
    }
    let micros = |key: &str| position.get(key).and_then(|v| v.as_i64());
    Some(ClockState {
        splits: micros("max_event_time")
            .map(|m| (OneSplit.to_string(), m))
            .into_iter()
            .collect(),
        emitted: micros("watermark"),
    })
}

/// Splits a body into `(line number, record)` pairs: non-blank lines of NDJSON, or the
/// elements of a JSON array.
fn split_records(body: &[u8], is_array: bool) -> std::result::Result<Vec<(usize, &[u8])>, String> {
    if is_array {
        let items: Vec<&RawValue> = serde_json::from_slice(body)
            .map_err(|e| format!("the body is not a valid JSON array: {e}"))?;
        // `RawValue`s borrow from `body`; recover their byte ranges.
        return Ok(items
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i + 1, v.get().as_bytes()))
            .collect());
    }
    Ok(body
        .split(|b| *b == b'\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix(b"\r").unwrap_or(l)))
        .filter(|(_, l)| !l.trim_ascii().is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_lines_keep_their_numbers_and_skip_blanks() {
        let body = b"{\"a\":1}\r\n\n  \n{\"a\":2}\n";
        let r = split_records(body, false).unwrap();
        assert_eq!(r, vec![(1, &b"{\"a\":1}"[..]), (4, &b"{\"a\":2}"[..])]);
    }

    #[test]
    fn arrays_split_into_elements() {
        let body = br#"[{"a":1}, {"a":2}]"#;
        let r = split_records(body, true).unwrap();
        assert_eq!(r, vec![(1, &br#"{"a":1}"#[..]), (2, &br#"{"a":2}"#[..])]);
        assert!(
            split_records(b"[{\"a\":1}", true)
                .unwrap_err()
                .starts_with("the body is not a valid JSON array")
        );
    }
}

/// Fuzz-style properties of what a request body goes through: any bytes — random, truncated
/// documents, deep nesting, long runs — are split and decoded without a panic, and every
/// record is either accepted or rejected with a reason.
#[cfg(test)]
mod fuzz {
    use std::sync::Arc;

    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use proptest::prelude::*;

    use super::*;
    use crate::formats::json::JsonDecoder;

    fn decoder() -> JsonDecoder {
        JsonDecoder::new(Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
            Field::new("amount", DataType::Float64, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new("ok", DataType::Boolean, true),
        ])))
    }

    /// Pieces bodies are made of: JSON fragments, separators, and hostile runs.
    fn piece() -> impl Strategy<Value = Vec<u8>> {
        let fragments: Vec<&'static [u8]> = vec![
            br#"{"id":1,"name":"a","amount":1.5,"ts":"2024-05-01T00:00:00Z","ok":true}"#,
            b"{",
            b"}",
            b"[",
            b"]",
            b",",
            b":",
            b"\n",
            b"\"",
            b"\\",
            br#""id""#,
            br#""ts":"#,
            b"9223372036854775808",
            b"-1e400",
            b"00",
            b"null",
            b"\xff\xfe",
            b"\x00",
        ];
        prop_oneof![
            18 => prop::sample::select(fragments).prop_map(<[u8]>::to_vec),
            1 => (1usize..5000).prop_map(|n| b"[".repeat(n)),
            1 => (1usize..5000).prop_map(|n| br#"{"a":"#.repeat(n)),
            1 => prop::collection::vec(any::<u8>(), 0..64),
        ]
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(piece(), 0..24).prop_map(|p| p.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn any_body_splits_and_decodes_without_a_panic(body in body(), truncate in any::<prop::sample::Index>()) {
            let body = &body[..truncate.index(body.len() + 1)];
            for is_array in [false, true] {
                if let Ok(records) = split_records(body, is_array) {
                    let slices: Vec<&[u8]> = records.iter().map(|(_, r)| *r).collect();
                    let decoded = decoder().decode(&slices).expect("decoding never fails whole");
                    prop_assert_eq!(decoded.batch.num_rows() + decoded.errors.len(), slices.len());
                    for e in &decoded.errors {
                        prop_assert!(!e.reason.is_empty());
                    }
                    // What the JSON spec refuses is never accepted (serde_json is strict).
                    for (i, r) in slices.iter().enumerate() {
                        if serde_json::from_slice::<serde::de::IgnoredAny>(r).is_err() {
                            prop_assert!(
                                decoded.errors.iter().any(|e| e.index == i),
                                "accepted, but not JSON: {:?}",
                                String::from_utf8_lossy(r)
                            );
                        }
                    }
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl sluice_engine::push::PushSource for HttpIngest {
    fn max_request_size(&self) -> u64 {
        HttpIngest::max_request_size(self)
    }

    async fn ingest(
        &self,
        body: Bytes,
        origin: &str,
        key: Option<&str>,
    ) -> Result<IngestReport, IngestError> {
        HttpIngest::ingest(self, body, origin, key).await
    }

    fn checkpoint(self: std::sync::Arc<Self>, checkpoint: ReaderCheckpoint) {
        HttpIngest::checkpoint(&self, checkpoint);
    }

    async fn replay(&self, position: &serde_json::Value) -> sluice_engine::Result<usize> {
        Ok(HttpIngest::replay(self, position).await?)
    }
}
