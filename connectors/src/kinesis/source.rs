//! [`KinesisReader`]: every shard of one data stream → batches, per-shard watermarks, parents
//! before children.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sluice_engine::retry::RetryPolicy;

use arrow::array::{ArrayRef, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::types::{Record, Shard, ShardIteratorType};
use sluice_engine::source::publish;
use sluice_engine::{BadRecord, EngineError, SourceContext, SourceReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{KinesisConfig, KinesisStart, compare_sequence_numbers};
use crate::formats::Decoder;
use crate::lake::RecordZone;
use crate::split_clock::{
    ClockState, SplitClock, advance_watermark, event_times, resend_watermark,
};

/// What a [`KinesisReader`] does with what it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReaderRole {
    /// The source's own reader: archives values in the raw zone (with `raw_zone`) and sends
    /// records that fail to decode to the errors zone, once for the source. Publishes nothing.
    Archive,
    /// A stream's reader: publishes the decoded rows and the watermark; skips bad records
    /// (the archiving reader reports them).
    Stream,
}

/// What one shard's reader hands over: a `GetRecords` answer.
struct ShardBatch {
    shard: String,
    records: Vec<Record>,
    millis_behind: Option<i64>,
    /// The shard is closed and read to its end.
    ended: bool,
}

/// Where a shard is in its life, as this reader knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShardState {
    /// Known; waits for its parents to end.
    Waiting,
    /// Its reader runs.
    Reading,
    /// Read to its end (or closed before this reader started at `latest`).
    Ended,
}

#[derive(Debug)]
struct KnownShard {
    parents: Vec<String>,
    state: ShardState,
}

/// How often shards are listed to find children of splits and merges.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(5);
/// The service allows five `GetRecords` per second per shard.
const MIN_CALL_INTERVAL: Duration = Duration::from_millis(200);

/// Reads every shard of the stream. See the module docs.
pub struct KinesisReader {
    name: String,
    config: KinesisConfig,
    schema: SchemaRef,
    role: ReaderRole,
    raw: Option<RecordZone>,
    /// The archiver's errors zone, written by itself (staged) when it checkpoints.
    errors: Option<RecordZone>,
    /// Where to resume, from a checkpoint.
    resume: Option<Resume>,
    /// The event time per shard there, and the watermark sent, from a checkpoint.
    resume_clock: ClockState,
}

/// A checkpointed position: per shard started, the sequence number of the last record
/// handed over (`None`: none yet); and the shards read to their end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Resume {
    shards: BTreeMap<String, Option<String>>,
    ended: std::collections::BTreeSet<String>,
}

impl Resume {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "shards": self.shards, "ended": self.ended })
    }

    fn from_json(v: &serde_json::Value) -> Option<Self> {
        let shards = v
            .get("shards")?
            .as_object()?
            .iter()
            .map(|(k, s)| Some((k.clone(), s.as_str().map(str::to_string))))
            .collect::<Option<_>>()?;
        let ended = v
            .get("ended")?
            .as_array()?
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<_>>()?;
        Some(Self { shards, ended })
    }
}

impl KinesisReader {
    /// A stream's reader for source `name` producing `schema`.
    pub fn for_stream(name: impl Into<String>, config: KinesisConfig, schema: SchemaRef) -> Self {
        Self {
            name: name.into(),
            config,
            schema,
            role: ReaderRole::Stream,
            raw: None,
            errors: None,
            resume: None,
            resume_clock: ClockState::default(),
        }
    }

    /// The source's archiving reader (raw zone when `raw_zone`, errors zone, lag).
    pub fn archiver(
        name: impl Into<String>,
        config: KinesisConfig,
        schema: SchemaRef,
        raw: Option<RecordZone>,
        errors: RecordZone,
    ) -> Self {
        Self {
            name: name.into(),
            config,
            schema,
            role: ReaderRole::Archive,
            raw,
            errors: Some(errors),
            resume: None,
            resume_clock: ClockState::default(),
        }
    }

    fn failed(&self, what: impl std::fmt::Display) -> EngineError {
        EngineError::external(
            format!(
                "kinesis source `{}` (stream `{}`)",
                self.name, self.config.stream
            ),
            std::io::Error::other(what.to_string()),
        )
    }

    /// Every shard of the stream, with `ListShards`.
    async fn list_shards(&self, client: &Client) -> sluice_engine::Result<Vec<Shard>> {
        let mut shards = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let request = match &token {
                Some(t) => client.list_shards().next_token(t),
                None => client.list_shards().stream_name(&self.config.stream),
            };
            let page = request
                .send()
                .await
                .map_err(|e| self.failed(aws_sdk_kinesis::error::DisplayErrorContext(e)))?;
            shards.extend(page.shards().iter().cloned());
            match page.next_token() {
                Some(t) => token = Some(t.to_string()),
                None => return Ok(shards),
            }
        }
    }

    /// The columns decoded from record data: all but the metadata columns.
    fn value_schema(&self) -> SchemaRef {
        let fields: Vec<_> = self
            .schema
            .fields()
            .iter()
            .filter(|f| !f.name().starts_with("_kinesis_"))
            .cloned()
            .collect();
        Arc::new(Schema::new(fields))
    }

    /// Decodes, archives and publishes one shard's records.
    async fn handle(
        &self,
        ctx: &SourceContext,
        decoder: &mut Decoder,
        batch: &ShardBatch,
        clock: &mut SplitClock<String>,
    ) -> sluice_engine::Result<()> {
        if batch.records.is_empty() {
            return Ok(());
        }
        let records = &batch.records;
        if let Some(raw) = &self.raw {
            let values = records.iter().map(|r| r.data().as_ref());
            raw.put_values(values, self.config.format.is_binary())
                .await
                .map_err(|e| self.failed(format!("raw zone: {e}")))?;
        }
        let values: Vec<&[u8]> = records.iter().map(|r| r.data().as_ref()).collect();
        let decoded = decoder.decode(&values).await.map_err(|e| self.failed(e))?;
        let binary = self.config.format.is_binary();
        if self.role == ReaderRole::Archive {
            if !decoded.errors.is_empty() {
                let bad: Vec<BadRecord> = decoded
                    .errors
                    .iter()
                    .map(|e| {
                        let r = &records[e.index];
                        crate::formats::bad_record(
                            values[e.index],
                            binary,
                            e.reason.clone(),
                            format!(
                                "kinesis stream {} shard {} sequence {}",
                                self.config.stream,
                                batch.shard,
                                r.sequence_number()
                            ),
                        )
                    })
                    .collect();
                ctx.metrics.add_bad_records(bad.len());
                match &self.errors {
                    Some(errors) => errors
                        .put_bad_records(&bad)
                        .await
                        .map(|_| ())
                        .map_err(|e| self.failed(format!("errors zone: {e}")))?,
                    None => {
                        let _ = ctx.bad_records.send(bad).await;
                    }
                }
            }
            return Ok(());
        }
        let mut failed = vec![false; records.len()];
        for e in &decoded.errors {
            failed[e.index] = true;
        }
        let good: Vec<&Record> = records
            .iter()
            .zip(&failed)
            .filter(|(_, f)| !**f)
            .map(|(r, _)| r)
            .collect();
        let rows = self.with_metadata(decoded.batch, &batch.shard, &good)?;
        let max = event_times(ctx, &rows).and_then(arrow::compute::max);
        clock.delivered(batch.shard.clone(), max);
        publish(ctx, &mut None, rows).await;
        Ok(())
    }

    /// The source's rows: decoded columns and metadata columns, in the declared order.
    fn with_metadata(
        &self,
        values: RecordBatch,
        shard: &str,
        good: &[&Record],
    ) -> sluice_engine::Result<RecordBatch> {
        crate::formats::with_metadata_columns(&self.schema, values, |name| {
            Some(match name {
                "_kinesis_partition_key" => Arc::new(StringArray::from_iter_values(
                    good.iter().map(|r| r.partition_key().unwrap_or_default()),
                )) as ArrayRef,
                "_kinesis_sequence_number" => Arc::new(StringArray::from_iter_values(
                    good.iter().map(|r| r.sequence_number()),
                )),
                "_kinesis_shard_id" => {
                    Arc::new(StringArray::from_iter_values(good.iter().map(|_| shard)))
                }
                "_kinesis_arrival_time" => Arc::new(
                    TimestampMillisecondArray::from_iter(good.iter().map(|r| {
                        r.approximate_arrival_timestamp()
                            .and_then(|t| t.to_millis().ok())
                    }))
                    .with_timezone("UTC"),
                ),
                _ => return None,
            })
        })
    }
}

/// Reads one shard from `start` to its end (or until cancelled), handing each answer over.
struct ShardReader {
    client: Client,
    stream: String,
    shard: String,
    start: ShardIteratorType,
    /// Resume after this sequence number (from a checkpoint) instead of at `start`.
    after: Option<String>,
    limit: i32,
    poll_interval: Duration,
}

impl ShardReader {
    async fn iterator(&self, after: Option<&str>) -> Result<String, String> {
        let mut request = self
            .client
            .get_shard_iterator()
            .stream_name(&self.stream)
            .shard_id(&self.shard);
        request = match after {
            Some(seq) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(seq),
            None => request.shard_iterator_type(self.start.clone()),
        };
        let out = request
            .send()
            .await
            .map_err(|e| aws_sdk_kinesis::error::DisplayErrorContext(e).to_string())?;
        out.shard_iterator()
            .map(str::to_string)
            .ok_or_else(|| "no shard iterator".to_string())
    }

    async fn run(self, tx: mpsc::Sender<Result<ShardBatch, String>>, cancel: CancellationToken) {
        let outcome = tokio::select! {
            _ = cancel.cancelled() => Ok(()),
            r = self.read(&tx) => r,
        };
        if let Err(e) = outcome {
            let _ = tx.send(Err(format!("shard {}: {e}", self.shard))).await;
        }
    }

    async fn read(&self, tx: &mpsc::Sender<Result<ShardBatch, String>>) -> Result<(), String> {
        let mut iterator = self.iterator(self.after.as_deref()).await?;
        let mut last: Option<String> = self.after.clone();
        // Errors give up after ten retries; throttling (the 5 reads/s per shard that every
        // reader of the shard shares) is always waited out, with the same jittered backoff.
        let policy = RetryPolicy {
            initial: MIN_CALL_INTERVAL * 2,
            max_delay: MIN_CALL_INTERVAL * 32,
            max_attempts: Some(10),
            give_up_after: None,
        };
        let mut failures = policy.start();
        let mut throttled_for = RetryPolicy {
            max_attempts: None,
            ..policy
        }
        .start();
        loop {
            let called = tokio::time::Instant::now();
            let answer = self
                .client
                .get_records()
                .shard_iterator(&iterator)
                .limit(self.limit)
                .send()
                .await;
            let out = match answer {
                Ok(out) => {
                    failures.reset();
                    throttled_for.reset();
                    out
                }
                Err(e) => {
                    let expired = e
                        .as_service_error()
                        .is_some_and(|s| s.is_expired_iterator_exception());
                    // Throttling is the service's 5 reads/s per shard, shared by every reader
                    // of the shard: always waited out, never a failure.
                    let throttled = e
                        .as_service_error()
                        .is_some_and(|s| s.is_provisioned_throughput_exceeded_exception());
                    let text = aws_sdk_kinesis::error::DisplayErrorContext(&e).to_string();
                    // A deleted stream does not come back: no point in retrying.
                    if e.as_service_error()
                        .is_some_and(|s| s.is_resource_not_found_exception())
                    {
                        return Err(format!("the stream or shard no longer exists: {text}"));
                    }
                    let delay = if throttled {
                        throttled_for.next_delay()
                    } else {
                        failures.next_delay()
                    };
                    let Some(delay) = delay else {
                        return Err(text);
                    };
                    tracing::warn!(shard = %self.shard, "kinesis GetRecords: {text}; retrying");
                    tokio::time::sleep(delay).await;
                    if expired {
                        iterator = self.iterator(last.as_deref()).await?;
                    }
                    continue;
                }
            };
            // After a re-fetched iterator, never hand over a record twice.
            let records: Vec<Record> = out
                .records()
                .iter()
                .filter(|r| {
                    last.as_deref()
                        .is_none_or(|l| compare_sequence_numbers(r.sequence_number(), l).is_gt())
                })
                .cloned()
                .collect();
            if let Some(r) = records.last() {
                last = Some(r.sequence_number().to_string());
            }
            let got = records.len();
            let next = out.next_shard_iterator().map(str::to_string);
            let batch = ShardBatch {
                shard: self.shard.clone(),
                records,
                millis_behind: out.millis_behind_latest(),
                ended: next.is_none(),
            };
            if tx.send(Ok(batch)).await.is_err() {
                return Ok(());
            }
            let Some(next) = next else { return Ok(()) };
            iterator = next;
            let pause = if got == 0 {
                self.poll_interval
            } else {
                MIN_CALL_INTERVAL
            };
            tokio::time::sleep_until(called + pause.max(MIN_CALL_INTERVAL)).await;
        }
    }
}

/// The number in a shard id (`shardId-000000000007` → 7), for the lag report.
fn shard_number(id: &str) -> i32 {
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(-1)
}

#[async_trait]
impl SourceReader for KinesisReader {
    fn checkpointable(&self) -> bool {
        true
    }

    /// Position: `{"shards": {"<shard id>": "<last sequence number>" | null}, "ended": [...],
    /// "event_time": …}` (the event time per shard and the watermark sent, [`ClockState`]).
    fn restore(&mut self, position: &serde_json::Value) -> sluice_engine::Result<()> {
        let bad = || {
            EngineError::Checkpoint(format!(
                "kinesis source `{}`: position {position} is not {{\"shards\": {{…}}, \"ended\": […]}}",
                self.name
            ))
        };
        self.resume = Some(Resume::from_json(position).ok_or_else(bad)?);
        self.resume_clock = ClockState::read_from(position).ok_or_else(bad)?;
        Ok(())
    }

    async fn run(mut self: Box<Self>, mut ctx: SourceContext) -> sluice_engine::Result<()> {
        let mut checkpoint = ctx.checkpoint.take();
        if checkpoint.is_some() {
            self.raw = self.raw.take().map(RecordZone::staging);
            self.errors = self.errors.take().map(RecordZone::staging);
        } else {
            self.errors = None; // bad records go to the context's errors writer
        }
        let resume = self.resume.take();
        // What has been handed over so far, for checkpoints.
        let mut position = resume.clone().unwrap_or_default();
        let client = self.config.aws.client().await;
        let mut decoder = Decoder::new(&self.config.format, self.value_schema())?;
        let (tx, mut rx) = mpsc::channel::<Result<ShardBatch, String>>(16);
        let readers = ctx.cancel.child_token();
        let _stop_readers = readers.clone().drop_guard();
        let mut known: BTreeMap<String, KnownShard> = BTreeMap::new();
        let mut clock: SplitClock<String> = SplitClock::default();
        let mut lag: BTreeMap<String, i64> = BTreeMap::new();
        // From a checkpoint: each shard's event time, and the watermark sent (again now).
        let mut emitted = clock.restore(&self.resume_clock);
        if self.role == ReaderRole::Stream {
            resend_watermark(&ctx, emitted).await;
        }
        // After a restore, shards are read on from their positions, never from `latest`.
        let mut first_listing = resume.is_none();
        let mut discovery = tokio::time::interval(DISCOVERY_INTERVAL);
        let mut idle_tick = tokio::time::interval(Duration::from_secs(1));
        let mut rediscover = true;
        loop {
            if rediscover {
                rediscover = false;
                let shards = self.list_shards(&client).await?;
                for s in &shards {
                    if known.contains_key(s.shard_id()) {
                        continue;
                    }
                    let closed = s
                        .sequence_number_range()
                        .and_then(|r| r.ending_sequence_number())
                        .is_some();
                    let state = if position.ended.contains(s.shard_id())
                        || (first_listing && closed && self.config.start == KinesisStart::Latest)
                    {
                        ShardState::Ended // read before, or nothing new can come from it
                    } else {
                        ShardState::Waiting
                    };
                    let parents = [s.parent_shard_id(), s.adjacent_parent_shard_id()]
                        .into_iter()
                        .flatten()
                        .map(str::to_string)
                        .collect();
                    known.insert(s.shard_id().to_string(), KnownShard { parents, state });
                }
                // Start every shard whose parents have ended (or are gone from the listing).
                let ready: Vec<String> = known
                    .iter()
                    .filter(|(_, k)| {
                        k.state == ShardState::Waiting
                            && k.parents.iter().all(|p| {
                                known.get(p).is_none_or(|pk| pk.state == ShardState::Ended)
                            })
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in ready {
                    let start = if first_listing && self.config.start == KinesisStart::Latest {
                        ShardIteratorType::Latest
                    } else {
                        ShardIteratorType::TrimHorizon
                    };
                    known.get_mut(&id).expect("listed").state = ShardState::Reading;
                    clock.add(id.clone());
                    let after = position.shards.entry(id.clone()).or_default().clone();
                    tracing::info!(source = %self.name, shard = %id, "kinesis: reading shard");
                    let reader = ShardReader {
                        client: client.clone(),
                        stream: self.config.stream.clone(),
                        shard: id,
                        start,
                        after,
                        limit: self.config.batch_size,
                        poll_interval: self.config.poll_interval,
                    };
                    tokio::spawn(reader.run(tx.clone(), readers.clone()));
                }
                first_listing = false;
            }
            tokio::select! {
                _ = ctx.cancel.cancelled() => return Ok(()),
                Some(batch) = rx.recv() => {
                    let batch = batch.map_err(|e| self.failed(e))?;
                    self.handle(&ctx, &mut decoder, &batch, &mut clock).await?;
                    if let Some(r) = batch.records.last() {
                        position
                            .shards
                            .insert(batch.shard.clone(), Some(r.sequence_number().to_string()));
                    }
                    if let Some(ms) = batch.millis_behind {
                        lag.insert(batch.shard.clone(), ms);
                    }
                    if batch.ended {
                        tracing::info!(source = %self.name, shard = %batch.shard, "kinesis: shard ended");
                        known.get_mut(&batch.shard).expect("a known shard").state = ShardState::Ended;
                        clock.remove(&batch.shard);
                        lag.remove(&batch.shard);
                        position.shards.remove(&batch.shard);
                        position.ended.insert(batch.shard.clone());
                        rediscover = true; // its children may start now
                    }
                    if self.role == ReaderRole::Archive {
                        ctx.metrics.set_partition_lag(
                            lag.iter().map(|(s, ms)| (shard_number(s), *ms)).collect(),
                        );
                    } else {
                        advance_watermark(&ctx, &clock, &mut emitted).await;
                    }
                }
                epoch = sluice_engine::checkpoint::barrier_due(&mut checkpoint) => {
                    if let Some(ck) = &mut checkpoint {
                        let mut files = vec![];
                        for zone in [&self.raw, &self.errors].into_iter().flatten() {
                            files.extend(zone.take_staged());
                        }
                        ck.staged(epoch, files);
                        let mut at = position.to_json();
                        clock.state(emitted).write_into(&mut at);
                        ck.barrier(&ctx.output, epoch, at).await;
                    }
                }
                _ = discovery.tick() => rediscover = true,
                _ = idle_tick.tick() => {
                    if self.role == ReaderRole::Stream {
                        advance_watermark(&ctx, &clock, &mut emitted).await;
                    }
                }
            }
        }
    }
}
