//! [`KafkaReader`]: every partition of one topic → batches, per-partition watermarks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, Int32Array, Int64Array, StringArray, TimestampMillisecondArray};
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::{ClientContext, Statistics};
use rdkafka::{Offset, TopicPartitionList};
use sluice_engine::connector::Splits;
use sluice_engine::{EngineError, SourceContext, SourceReader};

use super::fetch_queue::{FetchQueue, Fetched};
use super::offsets::{Offsets, lag, position_json};
use super::{FetchClient, KafkaConfig, StartPosition};
use crate::ingest::{Ingest, Rejects};
use crate::join::{JoinService, Joinable, Joined, Positions, barrier, join_channel, relay};
use crate::lake::RecordZone;
use crate::split_clock::{ClockState, resend_watermark};

/// One record, its value copied out of the consumer into the batch's shared buffer.
struct Record {
    partition: i32,
    offset: i64,
    /// Where its value is in the buffer; `None` for a record without a value.
    value: Option<std::ops::Range<usize>>,
    /// Where its key is in the buffer.
    key: Option<std::ops::Range<usize>>,
    /// Its timestamp, ms since the epoch.
    timestamp: Option<i64>,
    /// Its headers (when the source declares `_kafka_headers`): where they are in
    /// [`Records::headers`].
    headers: std::ops::Range<usize>,
}

/// One record header: its key, and where its value is in the buffer.
struct HeaderAt {
    key: String,
    value: Option<std::ops::Range<usize>>,
}

/// The records of one batch: their values back to back in one buffer (no allocation per
/// record). Batches are recycled: the reader hands an emptied one back to the poller, so
/// the buffers keep their capacity.
#[derive(Default)]
pub(super) struct Records {
    records: Vec<Record>,
    values: Vec<u8>,
    headers: Vec<HeaderAt>,
    /// Per partition in the batch, the offset of its last record.
    last_offsets: Vec<(i32, i64)>,
}

impl Records {
    pub(super) fn len(&self) -> usize {
        self.records.len()
    }

    /// Empties the batch, keeping its buffers.
    fn clear(&mut self) {
        self.records.clear();
        self.values.clear();
        self.headers.clear();
        self.last_offsets.clear();
    }

    /// Notes that the batch holds `offset` of `partition` (offsets arrive in order).
    fn note_offset(&mut self, partition: i32, offset: i64) {
        match self.last_offsets.iter_mut().find(|(p, _)| *p == partition) {
            Some((_, last)) => *last = offset,
            None => self.last_offsets.push((partition, offset)),
        }
    }

    /// Drops the records at or past `limit` in their partition, and those of partitions it
    /// does not name; a partition whose records reached the limit is marked read up to it
    /// in `next`.
    fn keep_before(&mut self, limit: &Offsets, next: &mut Offsets) {
        let before = self.records.len();
        self.records.retain(|r| match limit.get(&r.partition) {
            Some(&l) if r.offset < l => true,
            Some(&l) => {
                let reached = next.entry(r.partition).or_insert(l);
                *reached = (*reached).max(l);
                false
            }
            None => false,
        });
        if self.records.len() != before {
            self.last_offsets.clear();
            for i in 0..self.records.len() {
                let (p, o) = (self.records[i].partition, self.records[i].offset);
                self.note_offset(p, o);
            }
        }
    }

    fn value(&self, r: &Record) -> Option<&[u8]> {
        r.value.clone().map(|range| &self.values[range])
    }

    fn key(&self, r: &Record) -> Option<&[u8]> {
        r.key.clone().map(|range| &self.values[range])
    }
}

/// The consumer's context: turns librdkafka's statistics into the source's per-partition lag
/// (fetch side: the partition's high watermark as last fetched minus the reader's position),
/// when it is the source's own reader.
pub(super) struct LagReporter {
    topic: String,
    metrics: Option<Arc<sluice_engine::Metrics>>,
}

impl ClientContext for LagReporter {
    fn stats(&self, statistics: Statistics) {
        let (Some(metrics), Some(topic)) = (&self.metrics, statistics.topics.get(&self.topic))
        else {
            return;
        };
        let mut lag: Vec<(i32, i64)> = topic
            .partitions
            .values()
            .filter(|p| p.partition >= 0 && p.hi_offset >= 0)
            .map(|p| {
                // Before the first fetch the position is unknown: everything is behind.
                let position = p.app_offset.max(p.lo_offset).max(0);
                (p.partition, (p.hi_offset - position).max(0))
            })
            .collect();
        lag.sort_unstable();
        metrics.set_partition_lag(lag);
    }
}

impl ConsumerContext for LagReporter {}

/// What a [`KafkaReader`] is to its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The source's one reader: archives values in the raw zone (with `raw_zone`), sends
    /// records that fail to decode to the errors zone, publishes the rows and the watermark
    /// to the source's hub, commits offsets to the consumer group and reports lag; streams
    /// that start later join it ([`JoinService`]).
    Shared,
    /// A stream's reader that catches up with the shared reader, then joins it (see
    /// [`crate::join`]); skips bad records (the shared reader reports them).
    Backfill,
}

/// Reads every partition of the topic. See the module docs.
pub struct KafkaReader {
    name: String,
    config: KafkaConfig,
    schema: SchemaRef,
    role: Role,
    /// The shared reader's: answers the join requests of backfill readers.
    service: Option<JoinService<Offsets>>,
    /// A backfill reader's: the shared reader it joins.
    joinable: Option<Joinable<Offsets>>,
    raw: Option<RecordZone>,
    /// The shared reader's errors zone, written by itself (staged) when it checkpoints;
    /// otherwise bad records go to the context's errors writer.
    errors: Option<RecordZone>,
    /// Which of a record's key and headers are copied out with its value (its timestamp
    /// always is: it tells how far behind the reader is).
    wants: Wants,
    /// The partitions it reads.
    splits: Splits,
    /// Where to resume, per partition (the next offset to read), from a checkpoint.
    resume: Offsets,
    /// The event time per partition at `resume`, and the watermark sent, from a checkpoint.
    resume_clock: ClockState,
}

impl KafkaReader {
    /// The source's shared reader (source `name`, producing `schema`); `raw` is its raw zone
    /// when `raw_zone` is on, `errors` its errors zone. The [`Joinable`] makes backfill
    /// readers for streams that start while it runs ([`Self::backfill`]).
    pub fn shared(
        name: impl Into<String>,
        config: KafkaConfig,
        schema: SchemaRef,
        raw: Option<RecordZone>,
        errors: RecordZone,
    ) -> (Self, Joinable<Offsets>) {
        let (joinable, service) = join_channel();
        let mut reader = Self::new(name.into(), config, schema, Role::Shared);
        reader.service = Some(service);
        reader.raw = raw;
        reader.errors = Some(errors);
        (reader, joinable)
    }

    /// A backfill reader of source `name` for one stream: reads from the source's `start`
    /// until it is level with the shared reader behind `joinable`, then relays that one.
    pub fn backfill(
        name: impl Into<String>,
        config: KafkaConfig,
        schema: SchemaRef,
        joinable: Joinable<Offsets>,
    ) -> Self {
        let mut reader = Self::new(name.into(), config, schema, Role::Backfill);
        reader.joinable = Some(joinable);
        reader
    }

    fn new(name: String, config: KafkaConfig, schema: SchemaRef, role: Role) -> Self {
        Self {
            name,
            config,
            wants: Wants {
                key: schema.field_with_name("_kafka_key").is_ok(),
                headers: schema.field_with_name("_kafka_headers").is_ok(),
            },
            schema,
            role,
            service: None,
            joinable: None,
            raw: None,
            errors: None,
            splits: Splits::All,
            resume: Offsets::new(),
            resume_clock: ClockState::default(),
        }
    }

    /// Reads only the partitions `splits` names (partition numbers), not every one.
    pub fn with_splits(mut self, splits: Splits) -> Self {
        self.splits = splits;
        self
    }

    fn is_shared(&self) -> bool {
        self.role == Role::Shared
    }

    /// Whether the source's own fetch client reads the topic (else librdkafka does).
    fn fetches_itself(&self) -> bool {
        match self.config.fetcher {
            FetchClient::Auto => super::fetcher::speaks(&self.config.properties),
            FetchClient::Builtin => true,
            FetchClient::Librdkafka => false,
        }
    }

    fn consumer(
        &self,
        metrics: &Arc<sluice_engine::Metrics>,
    ) -> sluice_engine::Result<BaseConsumer<LagReporter>> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.config.brokers)
            // Statistics only where lag is reported from them (librdkafka fetching for the
            // shared reader): they cost per-message bookkeeping.
            .set(
                "statistics.interval.ms",
                if self.is_shared() && !self.fetches_itself() {
                    "1000"
                } else {
                    "0"
                },
            )
            // Partitions are assigned, not balanced by a group; the id is only required.
            .set("group.id", format!("sluice-{}", self.name))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            // When the fetched records outnumber `queued.min.messages`, librdkafka pauses the
            // partition's fetching this long (1 s by default): long enough for the reader to
            // drain the queue and sit idle. A short pause keeps the queue from running dry.
            .set("fetch.queue.backoff.ms", "20")
            .set(
                "auto.offset.reset",
                match self.config.start {
                    StartPosition::Earliest | StartPosition::Committed => "earliest",
                    StartPosition::Latest => "latest",
                },
            );
        for (k, v) in &self.config.properties {
            cfg.set(k, v);
        }
        let context = LagReporter {
            topic: self.config.topic.clone(),
            metrics: self.is_shared().then(|| Arc::clone(metrics)),
        };
        cfg.create_with_context(context)
            .map_err(|e| EngineError::external(format!("kafka source `{}`", self.name), e))
    }

    /// Assigns every partition of the topic, at `resume` (the start position for partitions
    /// it does not name), their records forwarded to one [`FetchQueue`]; returns it and the
    /// partitions.
    async fn assign(
        &self,
        consumer: Arc<BaseConsumer<LagReporter>>,
        resume: Offsets,
    ) -> sluice_engine::Result<(FetchQueue<LagReporter>, Vec<i32>)> {
        let topic = self.config.topic.clone();
        let start = match self.config.start {
            StartPosition::Earliest => Offset::Beginning,
            StartPosition::Latest => Offset::End,
            StartPosition::Committed => Offset::Stored,
        };
        let name = self.name.clone();
        let splits = self.splits.clone();
        tokio::task::spawn_blocking(move || {
            let context = || format!("kafka source `{name}`: topic `{topic}`");
            let partitions = topic_partitions(&consumer, &topic, &splits, &context())?;
            let mut tpl = TopicPartitionList::new();
            for p in &partitions {
                let at = resume.get(p).map_or(start, |o| Offset::Offset(*o));
                tpl.add_partition_offset(&topic, *p, at)
                    .map_err(|e| EngineError::external(context(), e))?;
            }
            // Before assigning: librdkafka keeps the forwarding when fetching starts.
            let queue = FetchQueue::new(Arc::clone(&consumer), &topic, &partitions)
                .map_err(|e| EngineError::external(context(), e))?;
            consumer
                .assign(&tpl)
                .map_err(|e| EngineError::external(context(), e))?;
            tracing::info!(source = %name, topic = %topic, partitions = partitions.len(), "kafka: assigned");
            Ok((queue, partitions))
        })
        .await
        .map_err(|e| EngineError::Internal(format!("kafka assignment task: {e}")))?
    }

    /// Commits `offsets` (the next offset per partition) to the source's consumer group,
    /// asynchronously: a failed commit only means a `start = 'committed'` reader starts a
    /// little earlier.
    fn commit(&self, consumer: &BaseConsumer<LagReporter>, offsets: &BTreeMap<i32, i64>) {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in offsets {
            if let Err(e) = tpl.add_partition_offset(&self.config.topic, *p, Offset::Offset(*o)) {
                tracing::warn!(source = %self.name, "kafka: cannot commit partition {p}: {e}");
            }
        }
        if let Err(e) = consumer.commit(&tpl, rdkafka::consumer::CommitMode::Async) {
            tracing::warn!(source = %self.name, "kafka: committing offsets failed: {e}");
        }
    }

    /// The source's own fetch client for every partition of the topic, at `from` (the
    /// start position for partitions it does not name).
    async fn fetcher(
        &self,
        ctx: &SourceContext,
        consumer: Arc<BaseConsumer<LagReporter>>,
        from: &Offsets,
    ) -> sluice_engine::Result<super::fetcher::Fetcher> {
        let read_committed = !self.config.properties.iter().any(|(k, v)| {
            k.eq_ignore_ascii_case("isolation.level") && v.eq_ignore_ascii_case("read_uncommitted")
        });
        let mut fetcher = super::fetcher::Fetcher {
            name: self.name.clone(),
            topic: self.config.topic.clone(),
            consumer,
            start: self.config.start,
            isolation: i8::from(read_committed),
            batch_size: self.config.batch_size,
            linger: self.config.linger,
            wants: self.wants,
            lag: self.is_shared().then(|| Arc::clone(&ctx.metrics)),
            positions: BTreeMap::new(),
        };
        let from = from.clone();
        let name = self.name.clone();
        let splits = self.splits.clone();
        tokio::task::spawn_blocking(move || {
            let topic = fetcher.topic.clone();
            let context = || format!("kafka source `{name}`: topic `{topic}`");
            let partitions = topic_partitions(&fetcher.consumer, &topic, &splits, &context())?;
            fetcher
                .resolve_positions(&partitions, &from)
                .map_err(|e| EngineError::external(context(), e))?;
            tracing::info!(source = %name, topic = %topic, partitions = partitions.len(), "kafka: fetching");
            Ok(fetcher)
        })
        .await
        .map_err(|e| EngineError::Internal(format!("kafka assignment task: {e}")))?
    }

    /// Starts fetching from `from` (the start position for partitions it does not name).
    async fn start_fetching(
        &self,
        ctx: &SourceContext,
        from: &Offsets,
    ) -> sluice_engine::Result<Fetching> {
        let consumer = Arc::new(self.consumer(&ctx.metrics)?);
        // The fetching runs on a thread of its own, which hands over whole batches: no
        // per-record wake-ups or timers on the async side. Handled batches go back to it.
        let (tx, batches) = tokio::sync::mpsc::channel(2);
        let (recycle, spares) = std::sync::mpsc::sync_channel(2);
        let partitions = if self.fetches_itself() {
            let fetcher = self.fetcher(ctx, Arc::clone(&consumer), from).await?;
            let partitions = fetcher.positions.keys().copied().collect();
            tokio::task::spawn_blocking(move || fetcher.run(tx, spares));
            partitions
        } else {
            let (queue, partitions) = self.assign(Arc::clone(&consumer), from.clone()).await?;
            let poller = Poller {
                name: self.name.clone(),
                queue,
                batch_size: self.config.batch_size,
                linger: self.config.linger,
                wants: self.wants,
            };
            tokio::task::spawn_blocking(move || poller.run(tx, spares));
            partitions
        };
        // The shared reader archives and reports bad records (itself, staged, when it
        // checkpoints); a backfill reader re-reads what the shared reader reported.
        let rejects = match (self.is_shared(), &self.errors) {
            (false, _) => Rejects::Ignored,
            (true, Some(errors)) => Rejects::Zone(Box::new(errors.clone())),
            (true, None) => Rejects::Context,
        };
        let mut ingest = Ingest::new(
            format!("kafka source `{}`", self.name),
            &self.config.format,
            Arc::clone(&self.schema),
            Some("_kafka_"),
        )?
        .with_raw(self.raw.clone())
        .with_rejects(rejects);
        // Every partition holds the watermark back until it delivers (or, with the source's
        // `idle_timeout`, until it has been quiet that long).
        for p in partitions {
            ingest.clock().add(p);
        }
        // From a checkpoint (what was read up to `resume`): each partition's event time.
        ingest.clock().restore(&self.resume_clock);
        Ok(Fetching {
            consumer,
            batches,
            recycle,
            ingest,
        })
    }

    /// Takes `batch` through the ingest stage, notes how far each partition was read, then
    /// hands the batch back to the polling thread.
    async fn handle(
        &self,
        ctx: &SourceContext,
        f: &mut Fetching,
        mut batch: Records,
        next_offsets: &mut Offsets,
    ) -> sluice_engine::Result<()> {
        for (partition, last) in &batch.last_offsets {
            next_offsets.insert(*partition, last + 1);
        }
        // How far behind the newest record the source is, in time: now minus the newest
        // timestamp just read (the shared reader's; zero again once caught up, below).
        if self.is_shared()
            && let Some(newest) = batch.records.iter().filter_map(|r| r.timestamp).max()
        {
            ctx.metrics
                .set_lag_millis(sluice_engine::EventTime::now().micros() / 1000 - newest);
        }
        let received = Received {
            topic: &self.config.topic,
            batch: &batch,
        };
        f.ingest.ingest(ctx, &received).await?;
        batch.clear();
        let _ = f.recycle.try_send(batch);
        Ok(())
    }

    /// The shared reader: see [`Role::Shared`].
    async fn run_shared(
        mut self: Box<Self>,
        mut ctx: SourceContext,
        service: &mut JoinService<Offsets>,
    ) -> sluice_engine::Result<()> {
        let mut checkpoint = ctx.checkpoint.take();
        let checkpointing = checkpoint.is_some();
        // It commits to the consumer group what each committed checkpoint covers.
        let mut to_commit: BTreeMap<u64, Offsets> = BTreeMap::new();
        let mut committed = checkpoint.as_ref().map(|c| c.committed_epochs());
        if checkpointing {
            self.raw = self.raw.take().map(RecordZone::staging);
            self.errors = self.errors.take().map(RecordZone::staging);
        } else {
            self.errors = None; // bad records go to the context's errors writer
        }
        let mut next_offsets = self.resume.clone();
        service.set_position(&next_offsets);
        resend_watermark(&ctx, self.resume_clock.emitted).await;
        let mut f = self.start_fetching(&ctx, &next_offsets).await?;
        // Ticks so that quiet partitions are noticed.
        let mut idle_tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                biased;
                _ = ctx.cancel.cancelled() => return Ok(()),
                // Before the records: under steady load they are always ready, and a
                // barrier must not wait for a lull.
                epoch = sluice_engine::checkpoint::barrier_due(&mut checkpoint) => {
                    if let Some(ck) = &mut checkpoint {
                        ck.staged(epoch, f.ingest.take_staged());
                        let position = position_json(&next_offsets, &f.clock_state());
                        service.barrier(epoch, position.clone());
                        ck.barrier(&ctx.output, epoch, position).await;
                    }
                    to_commit.insert(epoch, next_offsets.clone());
                }
                epoch = checkpoint_committed(&mut committed) => {
                    let mut done = to_commit.split_off(&(epoch + 1));
                    std::mem::swap(&mut done, &mut to_commit);
                    if let Some((_, offsets)) = done.pop_last() {
                        self.commit(&f.consumer, &offsets);
                    }
                }
                // Between two batches: a stream that joins now gets every row from here on.
                request = service.request() => {
                    service.serve(Some(request), &next_offsets, || f.clock_state(), &ctx.output);
                }
                batch = f.next() => {
                    self.handle(&ctx, &mut f, batch?, &mut next_offsets).await?;
                    service.set_position(&next_offsets);
                    service.serve(None, &next_offsets, || f.clock_state(), &ctx.output);
                }
                _ = idle_tick.tick() => {
                    f.ingest.clock().tick(&ctx).await;
                    // Nothing left to read: not behind at all.
                    if ctx.metrics.snapshot().partition_lag.iter().all(|(_, n)| *n == 0) {
                        ctx.metrics.set_lag_millis(0);
                    }
                }
            }
        }
    }

    /// A backfill reader: see [`crate::join`].
    async fn run_backfill(
        self: Box<Self>,
        mut ctx: SourceContext,
        joinable: Joinable<Offsets>,
    ) -> sluice_engine::Result<()> {
        let mut checkpoint = ctx.checkpoint.take();
        let mut mine = self.resume.clone();
        resend_watermark(&ctx, self.resume_clock.emitted).await;
        // Within a batch of the shared reader: joining now keeps the hub waiting at most
        // that long while this reader reads what lies between.
        let level = self.config.batch_size as i64;
        let mut fetching = None;
        let behind = report_lag(&ctx, &joinable, &mine);
        if behind > level {
            tracing::info!(source = %self.name, behind, "kafka: a stream catches up with the source");
            let mut f = self.start_fetching(&ctx, &mine).await?;
            let mut idle_tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    biased;
                    _ = ctx.cancel.cancelled() => return Ok(()),
                    epoch = sluice_engine::checkpoint::barrier_due(&mut checkpoint) => {
                        barrier(&ctx, &mut checkpoint, epoch, position_json(&mine, &f.clock_state())).await;
                    }
                    batch = f.next() => {
                        self.handle(&ctx, &mut f, batch?, &mut mine).await?;
                        if report_lag(&ctx, &joinable, &mine) <= level {
                            break;
                        }
                    }
                    _ = idle_tick.tick() => {
                        f.ingest.clock().tick(&ctx).await;
                        if report_lag(&ctx, &joinable, &mine) <= level {
                            break;
                        }
                    }
                }
            }
            fetching = Some(f);
        }
        let mut answer = joinable.join(&self.name, mine.clone()).await?;
        let joined = loop {
            tokio::select! {
                biased;
                _ = ctx.cancel.cancelled() => return Ok(()),
                epoch = sluice_engine::checkpoint::barrier_due(&mut checkpoint) => {
                    let clock = fetching.as_ref().map_or_else(|| self.resume_clock.clone(), Fetching::clock_state);
                    barrier(&ctx, &mut checkpoint, epoch, position_json(&mine, &clock)).await;
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
            let f = match &mut fetching {
                Some(f) => f,
                None => fetching.insert(self.start_fetching(&ctx, &mine).await?),
            };
            while !mine.covers(&target) {
                tokio::select! {
                    biased;
                    _ = ctx.cancel.cancelled() => return Ok(()),
                    epoch = sluice_engine::checkpoint::barrier_due(&mut checkpoint) => {
                        barrier(&ctx, &mut checkpoint, epoch, position_json(&mine, &f.clock_state())).await;
                    }
                    batch = f.next() => {
                        let mut batch = batch?;
                        batch.keep_before(&target, &mut mine);
                        self.handle(&ctx, f, batch, &mut mine).await?;
                    }
                }
            }
        }
        drop(fetching); // its consumer and polling thread stop
        ctx.metrics.set_partition_lag(vec![]);
        tracing::info!(source = %self.name, "kafka: a stream joined the source's reader");
        // A barrier the shared reader sent before the join is this reader's to send.
        if let Some(ck) = &mut checkpoint
            && let Some(epoch) = ck.due()
            && epoch <= last_barrier
        {
            ck.barrier(&ctx.output, epoch, position_json(&target, &target_clock))
                .await;
        }
        relay(&self.name, &joinable, &hub, subscription, &ctx, checkpoint).await
    }
}

/// Shows how far a backfill reader at `mine` is behind the shared reader (per partition, in
/// its counters: `SHOW STREAMS` reads them; cleared once joined); returns the total.
fn report_lag(ctx: &SourceContext, joinable: &Joinable<Offsets>, mine: &Offsets) -> i64 {
    let lag = lag(mine, &joinable.position());
    let total = lag.iter().map(|(_, n)| n).sum();
    ctx.metrics.set_partition_lag(lag);
    total
}

/// A reader's fetching: its consumer, the batches of its polling thread and its ingest
/// stage (decoder, event time). Dropping it stops the polling thread.
struct Fetching {
    consumer: Arc<BaseConsumer<LagReporter>>,
    batches: tokio::sync::mpsc::Receiver<Polled>,
    /// Handled batches go back to the polling thread.
    recycle: std::sync::mpsc::SyncSender<Records>,
    ingest: Ingest<i32>,
}

impl Fetching {
    /// Its event time, as a checkpoint keeps it.
    fn clock_state(&self) -> ClockState {
        self.ingest.clock_state()
    }

    /// The next batch of records.
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn next(&mut self) -> sluice_engine::Result<Records> {
        match self.batches.recv().await {
            Some(polled) => polled,
            None => Err(EngineError::Internal("kafka polling thread ended".into())),
        }
    }
}

#[async_trait]
impl SourceReader for KafkaReader {
    /// Both roles keep their position; the shared reader also its raw and errors files
    /// (staged, committed with the checkpoint).
    fn checkpointable(&self) -> bool {
        true
    }

    /// Position: `{"offsets": {"<partition>": <next offset>}, "event_time": …}` (the event
    /// time per partition and the watermark sent, [`ClockState`]). Partitions it does not
    /// name (added since) start at the `start` option.
    fn restore(&mut self, position: &serde_json::Value) -> sluice_engine::Result<()> {
        let bad = || {
            EngineError::Checkpoint(format!(
                "kafka source `{}`: position {position} is not {{\"offsets\": {{partition: offset}}}}",
                self.name
            ))
        };
        let offsets = position
            .get("offsets")
            .and_then(|o| o.as_object())
            .ok_or_else(bad)?;
        for (p, o) in offsets {
            let p: i32 = p.parse().map_err(|_| bad())?;
            self.resume.insert(p, o.as_i64().ok_or_else(bad)?);
        }
        self.resume_clock = ClockState::read_from(position).ok_or_else(bad)?;
        if let Some(service) = &self.service {
            // Streams starting before it runs compare themselves with where it resumes.
            service.set_position(&self.resume);
        }
        Ok(())
    }

    async fn run(mut self: Box<Self>, ctx: SourceContext) -> sluice_engine::Result<()> {
        match (self.service.take(), self.joinable.take()) {
            (Some(mut service), _) => {
                let result = self.run_shared(ctx, &mut service).await;
                service.ended(&result);
                result
            }
            (None, Some(joinable)) => self.run_backfill(ctx, joinable).await,
            (None, None) => Err(EngineError::Internal(format!(
                "kafka source `{}`: a reader runs once",
                self.name
            ))),
        }
    }
}

/// The partitions of `topic` among `splits`; an error when it has none (or does not exist),
/// or when `splits` names none of them. `context` names the source and topic in the error.
pub(super) fn topic_partitions<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    splits: &Splits,
    context: &str,
) -> sluice_engine::Result<Vec<i32>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| EngineError::external(context, e))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(EngineError::InvalidOption(format!(
            "{context}: the topic does not exist or has no partitions"
        )));
    }
    let mine: Vec<i32> = partitions
        .iter()
        .copied()
        .filter(|p| splits.contains(&p.to_string()))
        .collect();
    if mine.is_empty() {
        return Err(EngineError::InvalidOption(format!(
            "{context}: {splits:?} names none of the topic's partitions ({})",
            partitions
                .iter()
                .map(i32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(mine)
}

/// The epoch of the next committed checkpoint; never, without checkpoints.
async fn checkpoint_committed(committed: &mut Option<tokio::sync::watch::Receiver<u64>>) -> u64 {
    match committed {
        Some(rx) => match rx.changed().await {
            Ok(()) => *rx.borrow_and_update(),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Drains the [`FetchQueue`] on a blocking thread; hands over a batch when it holds
/// `batch_size` records or its first record is `linger` old.
struct Poller {
    name: String,
    queue: FetchQueue<LagReporter>,
    batch_size: usize,
    linger: Duration,
    wants: Wants,
}

pub(super) type Polled = sluice_engine::Result<Records>;

impl Poller {
    fn error(&self, e: KafkaError) -> EngineError {
        EngineError::external(format!("kafka source `{}`", self.name), e)
    }

    /// Runs until the receiving side goes away or librdkafka reports an error it cannot
    /// recover from.
    fn run(
        mut self,
        tx: tokio::sync::mpsc::Sender<Polled>,
        spares: std::sync::mpsc::Receiver<Records>,
    ) {
        // A non-fatal error is logged (librdkafka recovers by itself), at most this often.
        const WARN_EVERY: Duration = Duration::from_secs(10);
        // How long to wait for a record on a quiet topic before looking at the consumer's
        // own queue and at whether the reader is still there.
        const QUIET_POLL: Duration = Duration::from_millis(100);
        let mut last_warning: Option<std::time::Instant> = None;
        let mut batch = Records::default();
        loop {
            if tx.is_closed() {
                return;
            }
            // The consumer's own queue: statistics, commit results, errors. Its records all go
            // to the fetch queue.
            match self.queue.consumer().poll(Duration::ZERO) {
                None => {}
                Some(Ok(m)) => {
                    let _ = tx.blocking_send(Err(EngineError::Internal(format!(
                        "kafka source `{}`: record {} of partition {} arrived outside the \
                         fetch queue",
                        self.name,
                        m.offset(),
                        m.partition()
                    ))));
                    return;
                }
                Some(Err(e @ KafkaError::MessageConsumptionFatal(_))) => {
                    let _ = tx.blocking_send(Err(self.error(e)));
                    return;
                }
                Some(Err(e)) if last_warning.is_none_or(|at| at.elapsed() >= WARN_EVERY) => {
                    tracing::warn!(source = %self.name, "kafka: {e} (librdkafka retries)");
                    last_warning = Some(std::time::Instant::now());
                }
                Some(Err(_)) => {}
            }
            let mut failed = None;
            let wants = self.wants;
            let mut take = |fetched: Result<Fetched<'_>, KafkaError>| match fetched {
                Ok(m) => {
                    let Ok(()) = append(&mut batch, &m, wants);
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            };
            // Wait for the first record (a while: an idle topic costs no CPU), then up to
            // `linger` for the rest of the batch.
            if self.queue.consume(1, QUIET_POLL, &mut take) == 0 {
                continue;
            }
            let rest = self.batch_size.saturating_sub(1);
            self.queue.consume(rest, self.linger, &mut take);
            // Full, or `linger` passed since its first record: either way the batch goes.
            if batch.len() > 0 {
                let next = spares.try_recv().unwrap_or_default();
                if tx
                    .blocking_send(Ok(std::mem::replace(&mut batch, next)))
                    .is_err()
                {
                    return;
                }
            }
            if let Some(e) = failed {
                let _ = tx.blocking_send(Err(self.error(e)));
                return;
            }
        }
    }
}

/// Which metadata of a record the source declares as columns (`_kafka_key`, …) and so is
/// copied out with its value; none for the source's own reader.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Wants {
    key: bool,
    headers: bool,
}

/// A record as a fetch path hands it over: librdkafka's ([`Fetched`]) or the source's own
/// fetch client's.
pub(super) trait FetchedRecord {
    /// What reading its headers can fail with.
    type Error;
    fn partition(&self) -> i32;
    fn offset(&self) -> i64;
    /// Its value; `None` for a tombstone.
    fn payload(&self) -> Option<&[u8]>;
    fn key(&self) -> Option<&[u8]>;
    /// Its timestamp, ms since the epoch.
    fn timestamp(&self) -> Option<i64>;
    /// Calls `each` with every header: its name and value (`None` for a null value).
    fn headers(&self, each: impl FnMut(&str, Option<&[u8]>)) -> Result<(), Self::Error>;
}

impl FetchedRecord for Fetched<'_> {
    type Error = std::convert::Infallible;
    fn partition(&self) -> i32 {
        Fetched::partition(self)
    }
    fn offset(&self) -> i64 {
        Fetched::offset(self)
    }
    fn payload(&self) -> Option<&[u8]> {
        Fetched::payload(self)
    }
    fn key(&self) -> Option<&[u8]> {
        Fetched::key(self)
    }
    fn timestamp(&self) -> Option<i64> {
        Fetched::timestamp(self)
    }
    fn headers(&self, each: impl FnMut(&str, Option<&[u8]>)) -> Result<(), Self::Error> {
        Fetched::headers(self, each);
        Ok(())
    }
}

/// Copies fetched record `m` into `batch`; its key and headers only when asked.
pub(super) fn append<R: FetchedRecord>(
    batch: &mut Records,
    m: &R,
    wants: Wants,
) -> Result<(), R::Error> {
    let mut copy = |bytes: &[u8]| {
        let start = batch.values.len();
        batch.values.extend_from_slice(bytes);
        start..batch.values.len()
    };
    let value = m.payload().map(&mut copy);
    let key = if wants.key {
        m.key().map(&mut copy)
    } else {
        None
    };
    let first_header = batch.headers.len();
    if wants.headers {
        m.headers(|key, value| {
            let value = value.map(&mut copy);
            batch.headers.push(HeaderAt {
                key: key.to_string(),
                value,
            });
        })?;
    }
    let (partition, offset) = (m.partition(), m.offset());
    batch.note_offset(partition, offset);
    batch.records.push(Record {
        partition,
        offset,
        value,
        key,
        timestamp: m.timestamp(),
        headers: first_header..batch.headers.len(),
    });
    Ok(())
}

/// One polled batch as the ingest stage sees it.
struct Received<'a> {
    topic: &'a str,
    batch: &'a Records,
}

impl crate::ingest::Received for Received<'_> {
    type Split = i32;

    fn len(&self) -> usize {
        self.batch.records.len()
    }

    fn value(&self, i: usize) -> Option<&[u8]> {
        self.batch.value(&self.batch.records[i])
    }

    fn split(&self, i: usize) -> &i32 {
        &self.batch.records[i].partition
    }

    fn splits(&self) -> Vec<i32> {
        self.batch.last_offsets.iter().map(|(p, _)| *p).collect()
    }

    fn origin(&self, i: usize) -> String {
        let r = &self.batch.records[i];
        format!(
            "kafka topic {} partition {} offset {}",
            self.topic, r.partition, r.offset
        )
    }

    fn metadata(&self, name: &str, good: &[usize]) -> Option<ArrayRef> {
        let batch = self.batch;
        let records = || good.iter().map(|&i| &batch.records[i]);
        Some(match name {
            "_kafka_key" => Arc::new(StringArray::from_iter(records().map(|r| {
                batch
                    .key(r)
                    .map(|k| String::from_utf8_lossy(k).into_owned())
            }))) as ArrayRef,
            "_kafka_partition" => {
                Arc::new(Int32Array::from_iter_values(records().map(|r| r.partition)))
            }
            "_kafka_offset" => Arc::new(Int64Array::from_iter_values(records().map(|r| r.offset))),
            "_kafka_timestamp" => Arc::new(
                TimestampMillisecondArray::from_iter(records().map(|r| r.timestamp))
                    .with_timezone("UTC"),
            ),
            "_kafka_headers" => headers_array(batch, good),
            _ => return None,
        })
    }
}

/// The headers of records `good` as a `_kafka_headers` column: one JSON object each.
fn headers_array(batch: &Records, good: &[usize]) -> ArrayRef {
    let objects = good.iter().map(|&i| {
        let r = &batch.records[i];
        let object: serde_json::Map<String, serde_json::Value> = batch.headers[r.headers.clone()]
            .iter()
            .map(|h| {
                let value = h.value.clone().map(|range| {
                    serde_json::Value::String(String::from_utf8_lossy(&batch.values[range]).into())
                });
                (h.key.clone(), value.unwrap_or(serde_json::Value::Null))
            })
            .collect();
        serde_json::Value::Object(object).to_string()
    });
    Arc::new(StringArray::from_iter_values(objects))
}
