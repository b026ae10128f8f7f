//! [`KinesisReader`]: every shard of one data stream → batches, per-shard watermarks, parents
//! before children.
//!
//! A kinesis source has one shared reader: it calls `GetRecords` on each shard once for all
//! the streams reading the source, archives the raw records, reports bad ones, and publishes
//! the rows to the source's hub. A stream created while it runs (with `start =
//! 'trim_horizon'`) catches up with a backfill reader of its own and then joins it
//! ([`crate::join`]); while it catches up the shard has one more caller, after that none.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use sluice_engine::retry::RetryPolicy;

use arrow::array::{ArrayRef, StringArray, TimestampMillisecondArray};
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::types::{Record, Shard, ShardIteratorType};
use sluice_engine::connector::Splits;
use sluice_engine::{EngineError, SourceContext, SourceReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{KinesisConfig, KinesisStart, compare_sequence_numbers};
use crate::ingest::{Ingest, Rejects};
use crate::join::{JoinService, Joinable, Joined, Positions, barrier, join_channel, relay};
use crate::lake::RecordZone;
use crate::split_clock::{ClockState, resend_watermark};

/// Which of a source's readers a [`KinesisReader`] is.
enum Role {
    /// The source's one reader: archives values in the raw zone (with `raw_zone`), sends
    /// records that fail to decode to the errors zone, publishes the rows, and answers the
    /// join requests of backfill readers.
    Shared(JoinService<Resume>),
    /// A stream's reader that catches up with the shared reader, then joins it; skips bad
    /// records (the shared reader reports them).
    Backfill(Joinable<Resume>),
    /// Ran already.
    Done,
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
    role: Role,
    raw: Option<RecordZone>,
    /// The shared reader's errors zone, written by itself (staged) when it checkpoints.
    errors: Option<RecordZone>,
    /// The shards it reads.
    splits: Splits,
    /// Where to resume, from a checkpoint.
    resume: Option<Resume>,
    /// The event time per shard there, and the watermark sent, from a checkpoint.
    resume_clock: ClockState,
}

/// A reader's position: per shard started, the sequence number of the last record handed
/// over (`None`: none yet); and the shards read to their end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume {
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

    /// Notes that `records` of `shard` were handed over, and that the shard `ended` with them.
    fn advance(&mut self, shard: &str, records: &[Record], ended: bool) {
        if ended {
            self.shards.remove(shard);
            self.ended.insert(shard.to_string());
        } else if let Some(r) = records.last() {
            self.shards
                .insert(shard.to_string(), Some(r.sequence_number().to_string()));
        }
    }
}

impl Positions for Resume {
    /// Read to the end of every shard `other` ended, and at or past `other`'s sequence number
    /// in every shard it reads.
    fn covers(&self, other: &Self) -> bool {
        other.ended.iter().all(|s| self.ended.contains(s))
            && other.shards.iter().all(|(shard, seq)| {
                let Some(seq) = seq else { return true };
                self.ended.contains(shard)
                    || self.shards.get(shard).is_some_and(|mine| {
                        mine.as_deref()
                            .is_some_and(|m| compare_sequence_numbers(m, seq).is_ge())
                    })
            })
    }
}

impl KinesisReader {
    /// The source's shared reader (raw zone when `raw_zone`, errors zone, lag); the
    /// [`Joinable`] makes backfill readers for streams that start while it runs.
    pub fn shared(
        name: impl Into<String>,
        config: KinesisConfig,
        schema: SchemaRef,
        raw: Option<RecordZone>,
        errors: RecordZone,
    ) -> (Self, Joinable<Resume>) {
        let (joinable, service) = join_channel();
        let mut reader = Self::new(name.into(), config, schema, Role::Shared(service));
        reader.raw = raw;
        reader.errors = Some(errors);
        (reader, joinable)
    }

    /// A backfill reader of source `name` for one stream: reads from the source's `start`
    /// until it is level with the shared reader behind `joinable`, then relays that one.
    pub fn backfill(
        name: impl Into<String>,
        config: KinesisConfig,
        schema: SchemaRef,
        joinable: Joinable<Resume>,
    ) -> Self {
        Self::new(name.into(), config, schema, Role::Backfill(joinable))
    }

    fn new(name: String, config: KinesisConfig, schema: SchemaRef, role: Role) -> Self {
        Self {
            name,
            config,
            schema,
            role,
            raw: None,
            errors: None,
            splits: Splits::All,
            resume: None,
            resume_clock: ClockState::default(),
        }
    }

    /// Reads only the shards `splits` names (shard ids) and their descendants.
    pub fn with_splits(mut self, splits: Splits) -> Self {
        self.splits = splits;
        self
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

    /// The shards of the stream it reads (see [`Splits::Only`]: the ones named and their
    /// descendants), with `ListShards`.
    async fn list_shards(&self, client: &Client) -> sluice_engine::Result<Vec<Shard>> {
        let all = list_shards(client, &self.config.stream)
            .await
            .map_err(|e| self.failed(e))?;
        let Splits::Only(named) = &self.splits else {
            return Ok(all);
        };
        // A child is listed after its parents, but go until nothing changes to be sure.
        let mut mine: BTreeSet<&str> = named.iter().map(String::as_str).collect();
        loop {
            let before = mine.len();
            for s in &all {
                if [s.parent_shard_id(), s.adjacent_parent_shard_id()]
                    .into_iter()
                    .flatten()
                    .any(|p| mine.contains(p))
                {
                    mine.insert(s.shard_id());
                }
            }
            if mine.len() == before {
                break;
            }
        }
        let shards: Vec<Shard> = all
            .iter()
            .filter(|s| mine.contains(s.shard_id()))
            .cloned()
            .collect();
        if shards.is_empty() {
            let ids: Vec<&str> = all.iter().map(Shard::shard_id).collect();
            return Err(EngineError::InvalidOption(format!(
                "kinesis source `{}`: {:?} names none of stream `{}`'s shards ({})",
                self.name,
                self.splits,
                self.config.stream,
                ids.join(", ")
            )));
        }
        Ok(shards)
    }

    /// Takes one shard's records through the ingest stage.
    /// Takes one shard's records through the ingest stage.
    async fn handle(
        &self,
        ctx: &SourceContext,
        r: &mut Reading,
        shard: &str,
        records: &[Record],
    ) -> sluice_engine::Result<()> {
        let received = Received {
            stream: &self.config.stream,
            shard: shard.to_string(),
            records,
        };
        r.ingest.ingest(ctx, &received).await?;
        Ok(())
    }
}

/// Every shard of `stream`, with `ListShards`; the error is the SDK's, in words.
pub(super) async fn list_shards(client: &Client, stream: &str) -> Result<Vec<Shard>, String> {
    let mut shards = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let request = match &token {
            Some(t) => client.list_shards().next_token(t),
            None => client.list_shards().stream_name(stream),
        };
        let page = request
            .send()
            .await
            .map_err(|e| aws_sdk_kinesis::error::DisplayErrorContext(e).to_string())?;
        shards.extend(page.shards().iter().cloned());
        match page.next_token() {
            Some(t) => token = Some(t.to_string()),
            None => return Ok(shards),
        }
    }
}

/// One shard's records as the ingest stage sees them.
struct Received<'a> {
    stream: &'a str,
    shard: String,
    records: &'a [Record],
}

impl crate::ingest::Received for Received<'_> {
    type Split = String;

    fn len(&self) -> usize {
        self.records.len()
    }

    fn value(&self, i: usize) -> Option<&[u8]> {
        Some(self.records[i].data().as_ref())
    }

    fn split(&self, _: usize) -> &String {
        &self.shard
    }

    fn splits(&self) -> Vec<String> {
        vec![self.shard.clone()]
    }

    fn origin(&self, i: usize) -> String {
        format!(
            "kinesis stream {} shard {} sequence {}",
            self.stream,
            self.shard,
            self.records[i].sequence_number()
        )
    }

    fn metadata(&self, name: &str, good: &[usize]) -> Option<ArrayRef> {
        let records = || good.iter().map(|&i| &self.records[i]);
        Some(match name {
            "_kinesis_partition_key" => Arc::new(StringArray::from_iter_values(
                records().map(|r| r.partition_key().unwrap_or_default()),
            )) as ArrayRef,
            "_kinesis_sequence_number" => Arc::new(StringArray::from_iter_values(
                records().map(|r| r.sequence_number()),
            )),
            "_kinesis_shard_id" => Arc::new(StringArray::from_iter_values(
                records().map(|_| self.shard.as_str()),
            )),
            "_kinesis_arrival_time" => Arc::new(
                TimestampMillisecondArray::from_iter(records().map(|r| {
                    r.approximate_arrival_timestamp()
                        .and_then(|t| t.to_millis().ok())
                }))
                .with_timezone("UTC"),
            ),
            _ => return None,
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

/// A reader's shards: which it knows and reads, their readers' answers, its decoder, its
/// position and its event time. Dropping it stops the shard readers.
struct Reading {
    client: Client,
    ingest: Ingest<String>,
    known: BTreeMap<String, KnownShard>,
    /// Milliseconds behind the newest record, per shard read.
    lag: BTreeMap<String, i64>,
    /// What has been handed over.
    position: Resume,
    tx: mpsc::Sender<Result<ShardBatch, String>>,
    rx: mpsc::Receiver<Result<ShardBatch, String>>,
    readers: CancellationToken,
    _stop_readers: tokio_util::sync::DropGuard,
    /// No listing yet (a reader at `latest` skips what its first listing shows closed).
    first_listing: bool,
    /// List the shards before the next batch (children may have become readable).
    rediscover: bool,
    discovery: tokio::time::Interval,
    idle_tick: tokio::time::Interval,
}

/// What a [`Reading`] wakes up for.
enum Event {
    Batch(ShardBatch),
    Discover,
    Idle,
}

impl Reading {
    /// Its position and event time, as a checkpoint keeps them.
    fn position_json(&self) -> serde_json::Value {
        let mut at = self.position.to_json();
        self.ingest.clock_state().write_into(&mut at);
        at
    }

    /// Lists the shards and starts a reader for each whose parents have ended; with `limit`,
    /// only the shards it names (a backfill reads up to the shared reader's position).
    async fn discover(
        &mut self,
        source: &KinesisReader,
        limit: Option<&Resume>,
    ) -> sluice_engine::Result<()> {
        self.rediscover = false;
        let shards = source.list_shards(&self.client).await?;
        let latest = source.config.start == KinesisStart::Latest;
        for s in &shards {
            if self.known.contains_key(s.shard_id()) {
                continue;
            }
            let closed = s
                .sequence_number_range()
                .and_then(|r| r.ending_sequence_number())
                .is_some();
            let state = if self.position.ended.contains(s.shard_id())
                || (self.first_listing && closed && latest)
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
            self.known
                .insert(s.shard_id().to_string(), KnownShard { parents, state });
        }
        // Start every shard whose parents have ended (or are gone from the listing).
        let known = &self.known;
        let ready: Vec<String> = known
            .iter()
            .filter(|(id, k)| {
                k.state == ShardState::Waiting
                    && k.parents
                        .iter()
                        .all(|p| known.get(p).is_none_or(|pk| pk.state == ShardState::Ended))
                    && limit.is_none_or(|l| {
                        l.ended.contains(*id) || l.shards.get(*id).is_some_and(Option::is_some)
                    })
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in ready {
            let start = if self.first_listing && latest {
                ShardIteratorType::Latest
            } else {
                ShardIteratorType::TrimHorizon
            };
            self.known.get_mut(&id).expect("listed").state = ShardState::Reading;
            self.ingest.clock().add(id.clone());
            let after = self.position.shards.entry(id.clone()).or_default().clone();
            tracing::info!(source = %source.name, shard = %id, "kinesis: reading shard");
            let reader = ShardReader {
                client: self.client.clone(),
                stream: source.config.stream.clone(),
                shard: id,
                start,
                after,
                limit: source.config.batch_size,
                poll_interval: source.config.poll_interval,
            };
            tokio::spawn(reader.run(self.tx.clone(), self.readers.clone()));
        }
        self.first_listing = false;
        Ok(())
    }

    /// The next thing to do; lists the shards first when due.
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn next(&mut self, source: &KinesisReader) -> sluice_engine::Result<Event> {
        tokio::select! {
            batch = self.rx.recv() => match batch {
                Some(batch) => batch.map(Event::Batch).map_err(|e| source.failed(e)),
                None => Err(EngineError::Internal("kinesis shard readers ended".into())),
            },
            _ = self.discovery.tick() => Ok(Event::Discover),
            _ = self.idle_tick.tick() => Ok(Event::Idle),
        }
    }

    /// Notes a handed-over batch: position, lag, and a shard read to its end.
    fn advance(&mut self, source: &KinesisReader, shard: &str, records: &[Record], ended: bool) {
        self.position.advance(shard, records, ended);
        if ended {
            tracing::info!(source = %source.name, shard = %shard, "kinesis: shard ended");
            self.known.get_mut(shard).expect("a known shard").state = ShardState::Ended;
            self.ingest.clock().remove(&shard.to_string());
            self.lag.remove(shard);
            self.rediscover = true; // its children may start now
        }
    }

    /// Shows the lag per shard (milliseconds behind the newest record) in `ctx`'s counters.
    fn report_lag(&self, ctx: &SourceContext) {
        ctx.metrics.set_shard_lag_millis(
            self.lag
                .iter()
                .map(|(s, ms)| (shard_number(s), *ms))
                .collect(),
        );
    }
}

impl KinesisReader {
    /// Starts reading from `position` with event time `clock`; the shared reader (`shared`)
    /// archives records and reports those that fail to decode (a backfill reader re-reads
    /// what it reported).
    async fn start(
        &self,
        ctx: &SourceContext,
        position: Resume,
        clock: &ClockState,
        shared: bool,
    ) -> sluice_engine::Result<Reading> {
        let (tx, rx) = mpsc::channel(16);
        let readers = ctx.cancel.child_token();
        let (raw, rejects) = match (shared, &self.errors) {
            (false, _) => (None, Rejects::Ignored),
            (true, Some(errors)) => (self.raw.clone(), Rejects::Zone(Box::new(errors.clone()))),
            (true, None) => (self.raw.clone(), Rejects::Context),
        };
        let mut ingest = Ingest::new(
            format!(
                "kinesis source `{}` (stream `{}`)",
                self.name, self.config.stream
            ),
            &self.config.format,
            Arc::clone(&self.schema),
            Some("_kinesis_"),
        )?
        .with_raw(raw)
        .with_rejects(rejects);
        ingest.clock().restore(clock);
        let mut reading = Reading {
            client: self.config.aws.client().await,
            ingest,
            known: BTreeMap::new(),
            lag: BTreeMap::new(),
            // After a restore, shards are read on from their positions, never from `latest`.
            first_listing: self.resume.is_none() && position == Resume::default(),
            position,
            tx,
            rx,
            _stop_readers: readers.clone().drop_guard(),
            readers,
            rediscover: true,
            discovery: tokio::time::interval(DISCOVERY_INTERVAL),
            idle_tick: tokio::time::interval(Duration::from_secs(1)),
        };
        reading.discovery.reset();
        Ok(reading)
    }

    /// Hands over a whole `GetRecords` answer (see [`Self::handle`]) and notes it: position,
    /// lag, a shard read to its end.
    async fn take(
        &self,
        ctx: &SourceContext,
        r: &mut Reading,
        batch: &ShardBatch,
    ) -> sluice_engine::Result<()> {
        self.handle(ctx, r, &batch.shard, &batch.records).await?;
        if let Some(ms) = batch.millis_behind {
            r.lag.insert(batch.shard.clone(), ms);
        }
        r.advance(self, &batch.shard, &batch.records, batch.ended);
        r.report_lag(ctx);
        Ok(())
    }

    /// The shared reader: see [`Role::Shared`].
    async fn run_shared(
        mut self: Box<Self>,
        mut ctx: SourceContext,
        service: &mut JoinService<Resume>,
    ) -> sluice_engine::Result<()> {
        let mut checkpoint = ctx.checkpoint.take();
        if checkpoint.is_some() {
            self.raw = self.raw.take().map(RecordZone::staging);
            self.errors = self.errors.take().map(RecordZone::staging);
        } else {
            self.errors = None; // bad records go to the context's errors writer
        }
        let mut r = self
            .start(
                &ctx,
                self.resume.clone().unwrap_or_default(),
                &self.resume_clock,
                true,
            )
            .await?;
        service.set_position(&r.position);
        resend_watermark(&ctx, self.resume_clock.emitted).await;
        loop {
            if r.rediscover {
                r.discover(&self, None).await?;
            }
            tokio::select! {
                biased;
                _ = ctx.cancel.cancelled() => return Ok(()),
                epoch = sluice_engine::checkpoint::barrier_due(&mut checkpoint) => {
                    if let Some(ck) = &mut checkpoint {
                        ck.staged(epoch, r.ingest.take_staged());
                        let at = r.position_json();
                        service.barrier(epoch, at.clone());
                        ck.barrier(&ctx.output, epoch, at).await;
                    }
                }
                // Between two batches: a stream that joins now gets every row from here on.
                request = service.request() => {
                    service.serve(Some(request), &r.position, || r.ingest.clock_state(), &ctx.output);
                }
                event = r.next(&self) => match event? {
                    Event::Batch(batch) => {
                        self.take(&ctx, &mut r, &batch).await?;
                        service.set_position(&r.position);
                        service.serve(None, &r.position, || r.ingest.clock_state(), &ctx.output);
                    }
                    Event::Discover => r.rediscover = true,
                    Event::Idle => r.ingest.clock().tick(&ctx).await,
                },
            }
        }
    }

    /// A backfill reader: see [`crate::join`]. It reads until its position covers where the
    /// shared reader was when it started, asks to join there, then reads up to where the
    /// shared reader was when it was let in, and relays the shared reader's hub.
    async fn run_backfill(
        mut self: Box<Self>,
        mut ctx: SourceContext,
        joinable: Joinable<Resume>,
    ) -> sluice_engine::Result<()> {
        let mut checkpoint = ctx.checkpoint.take();
        let resume = self.resume.take().unwrap_or_default();
        let level = joinable.position();
        let mut reading: Option<Reading> = None;
        resend_watermark(&ctx, self.resume_clock.emitted).await;
        if !resume.covers(&level) {
            tracing::info!(source = %self.name, "kinesis: a stream catches up with the source");
            let mut r = self
                .start(&ctx, resume.clone(), &self.resume_clock, false)
                .await?;
            while !r.position.covers(&level) {
                if r.rediscover {
                    r.discover(&self, None).await?;
                }
                tokio::select! {
                    biased;
                    _ = ctx.cancel.cancelled() => return Ok(()),
                    epoch = sluice_engine::checkpoint::barrier_due(&mut checkpoint) => {
                        barrier(&ctx, &mut checkpoint, epoch, r.position_json()).await;
                    }
                    event = r.next(&self) => match event? {
                        Event::Batch(batch) => self.take(&ctx, &mut r, &batch).await?,
                        Event::Discover => r.rediscover = true,
                        Event::Idle => r.ingest.clock().tick(&ctx).await,
                    },
                }
            }
            reading = Some(r);
        }
        let mine = reading
            .as_ref()
            .map_or_else(|| resume.clone(), |r| r.position.clone());
        let mut answer = joinable.join(&self.name, mine.clone()).await?;
        let joined = loop {
            tokio::select! {
                biased;
                _ = ctx.cancel.cancelled() => return Ok(()),
                epoch = sluice_engine::checkpoint::barrier_due(&mut checkpoint) => {
                    let at = reading.as_ref().map_or_else(
                        || {
                            let mut at = resume.to_json();
                            self.resume_clock.write_into(&mut at);
                            at
                        },
                        Reading::position_json,
                    );
                    barrier(&ctx, &mut checkpoint, epoch, at).await;
                }
                joined = &mut answer => break joined.map_err(|_| joinable.gone(&self.name, None))?,
            }
        };
        let Joined {
            subscription,
            position: target,
            clock: target_clock,
            last_barrier,
            hub,
        } = joined;
        // What the shared reader read before the join and this reader has not.
        if !mine.covers(&target) {
            let r = match &mut reading {
                Some(r) => r,
                None => reading.insert(self.start(&ctx, resume, &self.resume_clock, false).await?),
            };
            while !r.position.covers(&target) {
                if r.rediscover {
                    r.discover(&self, Some(&target)).await?;
                }
                tokio::select! {
                    biased;
                    _ = ctx.cancel.cancelled() => return Ok(()),
                    epoch = sluice_engine::checkpoint::barrier_due(&mut checkpoint) => {
                        barrier(&ctx, &mut checkpoint, epoch, r.position_json()).await;
                    }
                    event = r.next(&self) => match event? {
                        Event::Batch(batch) => {
                            let (records, ended) = keep_before(&target, &batch);
                            self.handle(&ctx, r, &batch.shard, records).await?;
                            r.advance(&self, &batch.shard, records, ended);
                        }
                        Event::Discover => r.rediscover = true,
                        Event::Idle => {}
                    },
                }
            }
        }
        drop(reading); // its shard readers stop
        ctx.metrics.set_partition_lag(vec![]);
        tracing::info!(source = %self.name, "kinesis: a stream joined the source's reader");
        // A barrier the shared reader sent before the join is this reader's to send.
        if let Some(ck) = &mut checkpoint
            && let Some(epoch) = ck.due()
            && epoch <= last_barrier
        {
            let mut at = target.to_json();
            target_clock.write_into(&mut at);
            ck.barrier(&ctx.output, epoch, at).await;
        }
        relay(&self.name, &joinable, &hub, subscription, &ctx, checkpoint).await
    }
}

/// The records of `batch` at or before `limit` (the shared reader's position when a backfill
/// joined it), and whether the shard ends with them.
fn keep_before<'a>(limit: &Resume, batch: &'a ShardBatch) -> (&'a [Record], bool) {
    if limit.ended.contains(&batch.shard) {
        return (&batch.records, batch.ended);
    }
    let Some(Some(last)) = limit.shards.get(&batch.shard) else {
        return (&[], false); // the shared reader reads all of it
    };
    let keep = batch
        .records
        .iter()
        .take_while(|r| compare_sequence_numbers(r.sequence_number(), last).is_le())
        .count();
    (&batch.records[..keep], false)
}

#[async_trait]
impl SourceReader for KinesisReader {
    /// Both roles keep their position; the shared reader also its raw and errors files
    /// (staged, committed with the checkpoint).
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
        let resume = Resume::from_json(position).ok_or_else(bad)?;
        self.resume_clock = ClockState::read_from(position).ok_or_else(bad)?;
        if let Role::Shared(service) = &self.role {
            // Streams starting before it runs compare themselves with where it resumes.
            service.set_position(&resume);
        }
        self.resume = Some(resume);
        Ok(())
    }

    async fn run(mut self: Box<Self>, ctx: SourceContext) -> sluice_engine::Result<()> {
        match std::mem::replace(&mut self.role, Role::Done) {
            Role::Shared(mut service) => {
                let result = self.run_shared(ctx, &mut service).await;
                service.ended(&result);
                result
            }
            Role::Backfill(joinable) => self.run_backfill(ctx, joinable).await,
            Role::Done => Err(EngineError::Internal(format!(
                "kinesis source `{}`: a reader runs once",
                self.name
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resume(shards: &[(&str, Option<&str>)], ended: &[&str]) -> Resume {
        Resume {
            shards: shards
                .iter()
                .map(|(s, q)| (s.to_string(), q.map(str::to_string)))
                .collect(),
            ended: ended.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn record(seq: &str) -> Record {
        Record::builder()
            .sequence_number(seq)
            .data(aws_sdk_kinesis::primitives::Blob::new("{}"))
            .partition_key("k")
            .build()
            .unwrap()
    }

    #[test]
    fn covers_compares_sequence_numbers_and_ended_shards() {
        let a = resume(&[("s0", Some("100")), ("s1", None)], &["p"]);
        assert!(a.covers(&resume(&[("s0", Some("99"))], &[])));
        assert!(a.covers(&resume(&[("s0", Some("100"))], &["p"])));
        assert!(!a.covers(&resume(&[("s0", Some("101"))], &[])));
        assert!(
            !a.covers(&resume(&[("s1", Some("5"))], &[])),
            "nothing read there"
        );
        assert!(
            a.covers(&resume(&[("s2", None)], &[])),
            "nothing to read there"
        );
        assert!(!a.covers(&resume(&[], &["s0"])), "not read to its end");
        assert!(
            a.covers(&resume(&[("p", Some("7"))], &[])),
            "read to its end"
        );
        // Numerically, not as text.
        assert!(resume(&[("s0", Some("1000"))], &[]).covers(&resume(&[("s0", Some("999"))], &[])));
    }

    #[test]
    fn a_backfill_keeps_what_the_shared_reader_had_not_read_when_it_joined() {
        let limit = resume(&[("s0", Some("20")), ("s1", None)], &["p"]);
        let batch = |shard: &str, ended| ShardBatch {
            shard: shard.into(),
            records: ["10", "20", "30"].map(record).to_vec(),
            millis_behind: None,
            ended,
        };
        let seqs = |b: &ShardBatch| {
            let (kept, ended) = keep_before(&limit, b);
            let seqs: Vec<_> = kept
                .iter()
                .map(|r| r.sequence_number().to_string())
                .collect();
            (seqs, ended)
        };
        assert_eq!(
            seqs(&batch("s0", true)),
            (vec!["10".into(), "20".into()], false)
        );
        assert_eq!(
            seqs(&batch("s1", false)),
            (vec![], false),
            "the shared reader reads it"
        );
        assert_eq!(
            seqs(&batch("s9", false)),
            (vec![], false),
            "not started by the shared reader"
        );
        assert_eq!(
            seqs(&batch("p", true)),
            (vec!["10".into(), "20".into(), "30".into()], true),
            "read to its end by the shared reader"
        );
    }
}
