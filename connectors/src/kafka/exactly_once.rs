//! Exactly-once delivery for the Kafka sink: rows are checkpointed with their epoch and sent
//! in one Kafka transaction per epoch once the epoch is durable.
//!
//! ```text
//!  rows of epoch e ─► held ─► Barrier(e): staged in the lake, reported ─► checkpoint e commits
//!                                           (pending/<e>.arrow is published) ─► begin txn,
//!                                           send, commit txn ─► pending/<e>.arrow deleted
//! ```
//!
//! The sink takes part in the server's checkpoints as a writer does: at each barrier it
//! stages the epoch's rows as an Arrow IPC file, and the checkpoint's phase two moves it to
//! `_sluice/sinks/<sink>/pending/`. A delivery task then sends the rows in a transaction
//! (`transactional.id` = `sluice-<sink>`) and deletes the file when the transaction is
//! committed. Rows therefore reach `read_committed` consumers once their checkpoint is
//! durable, as with Flink's exactly-once Kafka sink; after a crash the pending files are the
//! epochs still owed, wherever the process restarts.
//!
//! The commit-phase gap (a crash after the checkpoint, before or during the transaction's
//! commit — the case Arroyo leaves open) is closed without resuming the broker-side
//! transaction: every record carries the header `sluice-delivery: <sink>/<epoch>/<row>`, and
//! before an epoch is sent the partitions' end offsets are saved next to its file. When an
//! epoch is sent again (after a crash, or a failed attempt), the delivery task first
//! initialises the transactional producer (which aborts the old open transaction), reads the
//! topic from the saved offsets with `isolation.level = read_committed`, and sends only the
//! rows it does not find. On a broker that isolates transactions, an interrupted epoch's
//! records are invisible and all are sent again, in one transaction; on one that does not
//! (tansu), consumers already see the records of the aborted attempt, and only the missing
//! ones are sent. Either way each row is on the topic once for the consumers of that broker;
//! on a non-isolating broker an interrupted epoch's rows can arrive out of order and partly
//! before the epoch's end.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use rdkafka::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Headers;
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};
pub use sluice_engine::checkpoint::SinkCheckpoint;
use sluice_engine::checkpoint::{
    CheckpointHandle, CheckpointStore, CommitWatch, Payload, STAGING_DIR, StagedFile, read_ipc,
    write_ipc,
};
use sluice_engine::retry::RetryPolicy;
use sluice_engine::{Barrier, EngineError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::sink::RecordWriter;

/// The header naming each record an exactly-once sink sends: `<sink>/<epoch>/<row>`.
pub const DELIVERY_HEADER: &str = "sluice-delivery";

/// How long one broker request of the delivery task may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts at one epoch's transaction before the sink fails.
const ATTEMPTS: u32 = 8;

/// Where a sink's committed epochs wait for delivery.
fn pending_dir(sink: &str) -> String {
    format!("_sluice/sinks/{sink}/pending")
}

/// An epoch's rows on their way to the topic.
struct Owed {
    /// The epoch whose commit makes them deliverable (`None`: the final rows, reported when
    /// the input ended).
    epoch: Option<u64>,
    /// File stem: `<epoch:020>` or `<epoch:020>-final`; the delivery tag's last part.
    stem: String,
    rows: RecordBatch,
    /// Set when the checkpoint published the rows' file.
    published: Arc<AtomicU64>,
}

/// The sink side: holds rows until their barrier, stages them, hands them to delivery.
pub(super) struct EpochSink {
    name: String,
    store: Arc<dyn CheckpointStore>,
    handle: CheckpointHandle,
    held: Vec<RecordBatch>,
    schema: Option<SchemaRef>,
    /// The last epoch whose barrier passed.
    last_epoch: u64,
    owed: Option<mpsc::Sender<Owed>>,
    delivery: Option<JoinHandle<sluice_engine::Result<()>>>,
}

impl EpochSink {
    /// Starts the delivery task (which first sends what a previous run still owed).
    pub(super) fn start(name: &str, writer: RecordWriter, checkpoint: SinkCheckpoint) -> Self {
        let (tx, rx) = mpsc::channel(2);
        let delivery = Delivery {
            writer,
            store: Arc::clone(&checkpoint.store),
            commits: checkpoint.commits,
            delivered: checkpoint.delivered,
        };
        let first_epoch = checkpoint.handle.first_epoch();
        let task = tokio::spawn(delivery.run(rx, first_epoch));
        Self {
            name: name.to_string(),
            store: checkpoint.store,
            handle: checkpoint.handle,
            held: vec![],
            schema: None,
            last_epoch: first_epoch.saturating_sub(1),
            owed: Some(tx),
            delivery: Some(task),
        }
    }

    pub(super) fn write_batch(&mut self, batch: RecordBatch) -> sluice_engine::Result<()> {
        if batch.num_rows() > 0 {
            self.schema.get_or_insert_with(|| batch.schema());
            self.held.push(batch);
        }
        Ok(())
    }

    /// The rows held so far, staged under `stem`: the file to report, and the rows.
    async fn stage(
        &mut self,
        stem: &str,
    ) -> sluice_engine::Result<Option<(StagedFile, RecordBatch)>> {
        let Some(schema) = &self.schema else {
            return Ok(None);
        };
        if self.held.is_empty() {
            return Ok(None);
        }
        let rows = arrow::compute::concat_batches(schema, &self.held)?;
        self.held.clear();
        let file = StagedFile {
            staged: format!("{STAGING_DIR}/sinks/{}/{stem}.arrow", self.name),
            target: format!("{}/{stem}.arrow", pending_dir(&self.name)),
            // Deleted once delivered.
            transient: true,
            ..StagedFile::new("", "")
        };
        self.store.put(&file.staged, write_ipc(&rows)?).await?;
        Ok(Some((file, rows)))
    }

    async fn hand_over(&mut self, owed: Owed) -> sluice_engine::Result<()> {
        let sent = match &self.owed {
            Some(tx) => tx.send(owed).await.is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            // The delivery task ended: it failed.
            Err(self.delivery_result().await.err().unwrap_or_else(|| {
                EngineError::Internal(format!("sink `{}`: delivery stopped", self.name))
            }))
        }
    }

    async fn delivery_result(&mut self) -> sluice_engine::Result<()> {
        self.owed = None;
        match self.delivery.take() {
            Some(task) => task
                .await
                .map_err(|e| EngineError::Internal(format!("sink delivery task: {e}")))?,
            None => Ok(()),
        }
    }

    pub(super) async fn on_barrier(&mut self, b: Barrier) -> sluice_engine::Result<()> {
        let handle = self.handle.clone();
        let Some(report) = handle.on_barrier(b) else {
            // An epoch that began before this sink existed: its rows belong to the next one.
            return Ok(());
        };
        self.last_epoch = b.epoch;
        let published: Arc<AtomicU64> = Arc::default();
        let staged = self.stage(&format!("{:020}", b.epoch)).await?;
        let files = staged.iter().map(|(f, _)| f.clone()).collect();
        report.report(Payload::Staged {
            files,
            published: Arc::clone(&published),
        });
        if let Some((_, rows)) = staged {
            self.hand_over(Owed {
                epoch: Some(b.epoch),
                stem: format!("{:020}", b.epoch),
                rows,
                published,
            })
            .await?;
        }
        Ok(())
    }

    /// The input ended: the last rows go with the next checkpoint (which this final report
    /// brings about, as any writer's does; if the server is shutting down, they are replayed
    /// after the restart), and everything committed is delivered before this returns.
    pub(super) async fn close(&mut self) -> sluice_engine::Result<()> {
        let stem = format!("{:020}-final", self.last_epoch);
        let published: Arc<AtomicU64> = Arc::default();
        let staged = self.stage(&stem).await?;
        let files = staged.iter().map(|(f, _)| f.clone()).collect();
        self.handle.clone().finish(Payload::Staged {
            files,
            published: Arc::clone(&published),
        });
        if let Some((_, rows)) = staged {
            self.hand_over(Owed {
                epoch: None,
                stem,
                rows,
                published,
            })
            .await?;
        }
        self.delivery_result().await
    }

    /// The input failed: the rows since the last barrier are dropped (a restart replays
    /// them from the last checkpoint); the epochs already committed are still delivered.
    pub(super) async fn abort(&mut self) -> sluice_engine::Result<()> {
        self.held.clear();
        self.delivery_result().await
    }
}

impl Drop for EpochSink {
    fn drop(&mut self) {
        if let Some(task) = self.delivery.take() {
            task.abort();
        }
    }
}

/// The delivery task: sends committed epochs in transactions, in epoch order.
struct Delivery {
    writer: RecordWriter,
    store: Arc<dyn CheckpointStore>,
    commits: CommitWatch,
    delivered: Arc<AtomicU64>,
}

impl Delivery {
    async fn run(
        mut self,
        mut owed: mpsc::Receiver<Owed>,
        first_epoch: u64,
    ) -> sluice_engine::Result<()> {
        let producer = self.writer.producer.clone();
        blocking(move || producer.init_transactions(REQUEST_TIMEOUT))
            .await
            .map_err(|e| {
                self.writer.failed(format!(
                    "cannot start a transactional producer ({e}); a broker without transactions \
                     needs delivery = 'at_least_once'"
                ))
            })?;
        // What a previous run committed and had not delivered yet.
        let dir = pending_dir(&self.writer.sink);
        let mut files: Vec<String> = self
            .store
            .list(&dir)
            .await?
            .into_iter()
            .filter(|p| p.ends_with(".arrow"))
            .collect();
        files.sort();
        for path in files {
            let stem = path
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .trim_end_matches(".arrow")
                .to_string();
            let epoch: u64 = stem.get(..20).and_then(|e| e.parse().ok()).unwrap_or(0);
            if epoch >= first_epoch {
                continue; // this run's: it comes through the channel
            }
            let Some(bytes) = self.store.get(&path).await? else {
                continue;
            };
            let rows = read_ipc(&bytes, &path)?;
            tracing::info!(sink = %self.writer.sink, epoch = %stem, rows = rows.num_rows(), "delivering an epoch committed before the restart");
            self.deliver(&stem, &rows, true).await?;
        }
        while let Some(o) = owed.recv().await {
            // Its epoch's commit, or — when that one was aborted — the later one that carries
            // its file; the final rows, the commit their report brings about.
            let mut next = o.epoch.unwrap_or_else(|| self.commits.last_settled() + 1);
            while o.published.load(Ordering::Acquire) == 0 && self.commits.wait_settled(next).await
            {
                next = self.commits.last_settled() + 1;
            }
            if o.published.load(Ordering::Acquire) == 0 {
                // Not committed (the server is shutting down): replayed after the restart.
                continue;
            }
            self.deliver(&o.stem, &o.rows, false).await?;
        }
        Ok(())
    }

    /// Sends `rows` in one transaction (only those not on the topic yet when `resend`),
    /// then forgets them.
    async fn deliver(
        &mut self,
        stem: &str,
        rows: &RecordBatch,
        mut resend: bool,
    ) -> sluice_engine::Result<()> {
        let dir = pending_dir(&self.writer.sink);
        let offsets_path = format!("{dir}/{stem}.offsets.json");
        let tag = format!("{}/{stem}", self.writer.sink);
        let mut retry = RetryPolicy {
            initial: Duration::from_millis(250),
            max_delay: Duration::from_secs(5),
            max_attempts: Some(ATTEMPTS - 1),
            give_up_after: None,
        }
        .start();
        loop {
            let saved = if resend {
                self.store.get(&offsets_path).await?
            } else {
                None
            };
            let skip = match saved {
                Some(bytes) => {
                    let starts: BTreeMap<i32, i64> =
                        serde_json::from_slice(&bytes).map_err(|e| {
                            EngineError::Checkpoint(format!("{offsets_path} is unreadable: {e}"))
                        })?;
                    self.on_topic(starts, &tag).await?
                }
                None => {
                    // Nothing of this epoch was sent yet: remember where the topic ends.
                    let ends = self.end_offsets().await?;
                    let bytes = serde_json::to_vec(&ends).expect("offsets serialise");
                    self.store.put(&offsets_path, bytes.into()).await?;
                    HashSet::new()
                }
            };
            if !skip.is_empty() {
                tracing::info!(sink = %self.writer.sink, epoch = %stem, found = skip.len(), rows = rows.num_rows(), "rows already on the topic are not sent again");
            }
            match self.transaction(rows, &tag, &skip).await {
                Ok(()) => {
                    self.delivered
                        .fetch_add(rows.num_rows() as u64, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    let Some(delay) = retry.next_delay() else {
                        return Err(e);
                    };
                    let attempt = retry.failures();
                    tracing::warn!(sink = %self.writer.sink, epoch = %stem, attempt, error = %e, "transaction failed; retrying");
                    let producer = self.writer.producer.clone();
                    let _ = blocking(move || producer.abort_transaction(REQUEST_TIMEOUT)).await;
                    tokio::time::sleep(delay).await;
                    resend = true;
                }
            }
        }
        self.store.delete(&format!("{dir}/{stem}.arrow")).await?;
        self.store.delete(&offsets_path).await?;
        Ok(())
    }

    async fn transaction(
        &mut self,
        rows: &RecordBatch,
        tag: &str,
        skip: &HashSet<u64>,
    ) -> sluice_engine::Result<()> {
        self.writer
            .producer
            .begin_transaction()
            .map_err(|e| self.writer.failed(format!("begin transaction: {e}")))?;
        self.writer.send(rows, Some(tag), skip).await?;
        let producer = self.writer.producer.clone();
        blocking(move || producer.commit_transaction(REQUEST_TIMEOUT))
            .await
            .map_err(|e| self.writer.failed(format!("commit transaction: {e}")))
    }

    /// Each partition's end offset now.
    async fn end_offsets(&self) -> sluice_engine::Result<BTreeMap<i32, i64>> {
        let producer = self.writer.producer.clone();
        let topic = self.writer.config.topic.clone();
        blocking(move || {
            let client = producer.client();
            let metadata = client.fetch_metadata(Some(&topic), REQUEST_TIMEOUT)?;
            let mut ends = BTreeMap::new();
            for t in metadata.topics() {
                for p in t.partitions() {
                    let (_, high) = client.fetch_watermarks(&topic, p.id(), REQUEST_TIMEOUT)?;
                    ends.insert(p.id(), high);
                }
            }
            Ok(ends)
        })
        .await
        .map_err(|e| {
            self.writer
                .failed(format!("reading the topic's end offsets: {e}"))
        })
    }

    /// The rows of delivery `tag` a `read_committed` consumer sees on the topic, reading
    /// each partition from `starts` (from its beginning if absent) to its end.
    async fn on_topic(
        &self,
        starts: BTreeMap<i32, i64>,
        tag: &str,
    ) -> sluice_engine::Result<HashSet<u64>> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.writer.config.brokers)
            .set("group.id", format!("sluice-sink-{}", self.writer.sink))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true");
        for (k, v) in &self.writer.config.properties {
            // Producer settings do not apply to the consumer.
            if !matches!(
                k.as_str(),
                "linger.ms" | "acks" | "enable.idempotence" | "transactional.id"
            ) {
                cfg.set(k, v);
            }
        }
        let topic = self.writer.config.topic.clone();
        let prefix = format!("{tag}/");
        blocking(move || {
            let consumer: BaseConsumer = cfg.create()?;
            let metadata = consumer.fetch_metadata(Some(&topic), REQUEST_TIMEOUT)?;
            let mut assignment = TopicPartitionList::new();
            let mut open: HashSet<i32> = HashSet::new();
            let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
            for t in metadata.topics() {
                for p in t.partitions() {
                    let (low, high) = consumer.fetch_watermarks(&topic, p.id(), REQUEST_TIMEOUT)?;
                    let start = starts.get(&p.id()).copied().unwrap_or(low).max(low);
                    if start < high {
                        assignment.add_partition_offset(&topic, p.id(), Offset::Offset(start))?;
                        open.insert(p.id());
                        ends.insert(p.id(), high);
                    }
                }
            }
            let mut found = HashSet::new();
            if open.is_empty() {
                return Ok(found);
            }
            consumer.assign(&assignment)?;
            let deadline = Instant::now() + Duration::from_secs(120);
            while !open.is_empty() {
                if Instant::now() > deadline {
                    return Err(KafkaError::MessageConsumption(
                        rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
                    ));
                }
                match consumer.poll(Duration::from_millis(500)) {
                    None => {}
                    Some(Err(KafkaError::PartitionEOF(p))) => {
                        open.remove(&p);
                    }
                    Some(Err(e)) => return Err(e),
                    Some(Ok(m)) => {
                        if let Some(headers) = m.headers() {
                            for h in headers.iter() {
                                if h.key == DELIVERY_HEADER
                                    && let Some(row) = h
                                        .value
                                        .and_then(|v| std::str::from_utf8(v).ok())
                                        .and_then(|v| v.strip_prefix(&prefix))
                                        .and_then(|v| v.parse::<u64>().ok())
                                {
                                    found.insert(row);
                                }
                            }
                        }
                        if ends
                            .get(&m.partition())
                            .is_some_and(|&e| m.offset() + 1 >= e)
                        {
                            open.remove(&m.partition());
                        }
                    }
                }
            }
            Ok(found)
        })
        .await
        .map_err(|e| {
            self.writer.failed(format!(
                "reading back what an interrupted delivery sent: {e}"
            ))
        })
    }
}

/// Runs a blocking librdkafka call off the runtime's worker threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, KafkaError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(KafkaError::Canceled).inspect_err(|_| {
            tracing::error!("kafka call task: {e}");
        }),
    }
}
