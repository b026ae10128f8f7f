//! Starting and stopping the tasks of sources and streams.
//!
//! ```text
//!  pull source (datagen):                 one reader per stream that reads it, started with it
//!  push source (http), kafka, kinesis, s3: one shared FanOut, fed by requests or the source's reader
//!
//!  reader ──► FanOut ──┐
//!  source FanOut ──────┼─► StreamTask (operator chains, merge) ──► FanOut(stream) ──► lake writer
//!  FanOut(stream) ─────┘                                             └──► streams reading it
//! ```
//! As in Flink, every stream reads a pull source from the source's own start position with
//! its own reader, so a stream created later still sees every row. A kafka or kinesis source
//! has one reader for all its streams; a stream created while it runs catches up with a backfill
//! reader first ([`Input::CatchUp`]), as RisingWave's shared sources do. A stream reading
//! another stream sees that stream's rows from the moment it subscribes.
//!
//! Each stream has a cancellation token (a child of the server's) and a supervisor task that
//! records its status when its tasks end.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_connectors::lake::{
    CompactionCounts, Lake, OnFinal, ParquetLakeWriter, RecordZone, Zone, run_errors_writer,
};
use sluice_engine::checkpoint::{CheckpointHandle, Coordinator, Payload, StreamRegistration};
use sluice_engine::connector::{ReaderFactory, SinkSpec, SourceFeed};
use sluice_engine::pipeline::TaskWiring;
use sluice_engine::push::PushSource;
use sluice_engine::sink::run_sink;
use sluice_engine::{BadRecord, DEFAULT_CHANNEL_CAPACITY, FanOut, Message, Metrics, SourceContext};
use sluice_sql::parser::{CreateSink, CreateStream};
use sluice_sql::{SourceDef, StreamPlan};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{Result, ServerError};

/// How often rejected rows are flushed to the errors zone.
const ERRORS_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// The life-cycle state of a source or stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Its tasks are running.
    Running,
    /// Its input ended and everything was written.
    Finished,
    /// A task failed; the message says why.
    Failed(String),
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Running => f.write_str("running"),
            Status::Finished => f.write_str("finished"),
            Status::Failed(m) => write!(f, "failed: {m}"),
        }
    }
}

/// A status shared between a supervisor task and the catalog.
pub type SharedStatus = Arc<Mutex<Status>>;

fn set(status: &SharedStatus, s: Status) {
    *status.lock().unwrap_or_else(|e| e.into_inner()) = s;
}

/// Reads a shared status.
pub fn get(status: &SharedStatus) -> Status {
    status.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// A running source.
#[derive(Debug)]
pub struct RunningSource {
    /// Its definition.
    pub def: SourceDef,
    /// Its output.
    pub fanout: FanOut,
    /// Its counters.
    pub metrics: Arc<Metrics>,
    /// Its state.
    pub status: SharedStatus,
    /// Stops it.
    pub cancel: CancellationToken,
    /// The receiving end of a push source (fed by the HTTP front door).
    pub push: Option<Arc<dyn PushSource>>,
    /// Where a push source resumes: what it stored after this position (from the last
    /// checkpoint) is published again before it takes requests.
    pub replay_from: Option<serde_json::Value>,
    /// Its hub carries barriers and it replays after a crash (a push source or shared reader
    /// that checkpoints): streams reading it can checkpoint.
    pub checkpointed: bool,
    /// How a stream that starts while the source's shared reader runs catches up with it.
    pub backfill: Option<ReaderFactory>,
    /// Makes a stream's own reader, for a source read per stream.
    pub per_stream: Option<ReaderFactory>,
}

/// A running stream.
#[derive(Debug)]
pub struct RunningStream {
    /// The statement that made it.
    pub create: CreateStream,
    /// Its plan.
    pub plan: StreamPlan,
    /// Its output.
    pub fanout: FanOut,
    /// Its counters.
    pub metrics: Arc<Metrics>,
    /// Parquet files it made visible in the lake.
    pub files_written: Arc<AtomicU64>,
    /// Its compactions: hours compacted and marked complete, failures.
    pub compactions: Arc<CompactionCounts>,
    /// Its state.
    pub status: SharedStatus,
    /// Stops it.
    pub cancel: CancellationToken,
    /// It takes part in checkpoints.
    pub checkpointed: bool,
    /// How often it checkpoints (`None`: it does not).
    pub checkpoint_interval: Option<Duration>,
    /// The counters of its backfill readers, by source: their partition lag is how far
    /// behind the source's reader they are (empty once joined).
    pub backfills: Vec<(String, Arc<Metrics>)>,
    done: Option<JoinHandle<()>>,
}

fn errors_channel(lake: &Lake, name: &str) -> mpsc::Sender<Vec<BadRecord>> {
    let (tx, rx) = mpsc::channel(64);
    let zone = RecordZone::new(lake.clone(), Zone::Errors, name);
    tokio::spawn(run_errors_writer(zone, rx, ERRORS_FLUSH_INTERVAL));
    tx
}

/// Starts a source as its connector says it feeds streams ([`SourceFeed`]): a push source
/// gets its hub and ingest endpoint now; a shared reader starts (once `gate` opens) and
/// publishes to the hub; a source read per stream starts nothing yet (see [`Input`]). Push
/// sources and shared readers take part in checkpoints on their own; a push source's
/// position to replay from, if the last checkpoint has one, is in
/// [`RunningSource::replay_from`].
pub async fn start_source(
    lake: &Lake,
    def: SourceDef,
    parent: &CancellationToken,
    coordinator: Option<&Coordinator>,
    sql: &str,
    gate: &Gate,
) -> Result<RunningSource> {
    let fanout = FanOut::new(def.name.as_str());
    let metrics: Arc<Metrics> = Arc::default();
    let cancel = parent.child_token();
    let status: SharedStatus = Arc::new(Mutex::new(Status::Running));
    let mut ctx = SourceContext {
        output: fanout.clone(),
        metrics: Arc::clone(&metrics),
        bad_records: errors_channel(lake, &def.name),
        cancel: cancel.clone(),
        watermark: def.watermark.clone(),
        checkpoint: None,
    };
    let feed = def
        .config
        .open(&def.name, Arc::clone(&def.schema), ctx.clone())?;
    let mut running = RunningSource {
        def,
        fanout,
        metrics,
        status,
        cancel,
        push: None,
        replay_from: None,
        checkpointed: false,
        backfill: None,
        per_stream: None,
    };
    let name = running.def.name.clone();
    match feed {
        SourceFeed::PerStream(make) => running.per_stream = Some(make),
        SourceFeed::Push(ingest) => {
            if let Some(c) = coordinator {
                // Its barriers go to the streams reading its hub; it replays after a crash.
                running.checkpointed = true;
                let (reader, position) = register_source(c, &name, sql, false).await?;
                running.replay_from = position;
                if let Some(reader) = reader {
                    Arc::clone(&ingest).checkpoint(reader);
                }
            }
            running.push = Some(ingest);
        }
        SourceFeed::Shared {
            mut reader,
            backfill,
        } => {
            running.backfill = backfill;
            // A shared reader that can checkpoints: its raw and errors files are committed
            // with the epoch, and it resumes from its last position.
            if let Some(c) = coordinator.filter(|_| reader.checkpointable()) {
                let (handle, position) = register_source(c, &name, sql, true).await?;
                if let Some(position) = position {
                    reader.restore(&position)?;
                }
                ctx.checkpoint = handle;
                running.checkpointed = true;
            }
            let status = Arc::clone(&running.status);
            let coordinator = coordinator.filter(|_| ctx.checkpoint.is_some()).cloned();
            let mut gate = gate.clone();
            let hub = running.fanout.clone();
            tokio::spawn(async move {
                // It publishes to streams: it starts once they are all back (at startup).
                let _ = gate.wait_for(|open| *open).await;
                if let Err(e) = reader.run(ctx).await {
                    tracing::error!(source = %name, error = %e, "the source's reader failed");
                    // Streams reading its hub fail too, rather than wait for rows that never come.
                    hub.abort(e.to_string());
                    set(&status, Status::Failed(e.to_string()));
                    if let Some(c) = coordinator {
                        // Checkpoints go on without it; its last position stays for a restart.
                        c.deregister(&source_participant(&name), true);
                    }
                }
            });
        }
    }
    Ok(running)
}

/// Registers a source's own reader with the checkpoints (as [`source_participant`]);
/// `writer`: it stages lake files itself. Returns its handle and the position to resume from.
async fn register_source(
    c: &Coordinator,
    name: &str,
    sql: &str,
    writer: bool,
) -> Result<(
    Option<sluice_engine::checkpoint::ReaderCheckpoint>,
    Option<serde_json::Value>,
)> {
    let mut ck = c
        .register(StreamRegistration {
            name: source_participant(name),
            sql: sql.to_string(),
            readers: vec![name.to_string()],
            parallelism: 0,
            writer,
            interval: c.default_interval(),
            timeout: None,
        })
        .await?;
    let position = ck
        .restored
        .take()
        .and_then(|r| r.positions.get(name).cloned());
    Ok((ck.readers.remove(name), position))
}

/// How a source that takes part in checkpoints itself (`http`) is named among them.
pub fn source_participant(name: &str) -> String {
    format!("source:{name}")
}

/// What a stream's branch reads.
#[derive(Debug)]
pub enum Input {
    /// The hub of a push source or of another stream.
    Hub {
        /// What the stream subscribes to.
        hub: FanOut,
        /// The source's `idle_timeout`.
        idle_timeout: Option<Duration>,
        /// A stream that checkpoints: its barriers come through the hub, and after a
        /// restart it replays what followed the last checkpoint.
        checkpointed: bool,
    },
    /// A source read per stream: the stream starts its own reader.
    Reader {
        /// The source.
        def: Box<SourceDef>,
        /// Makes the reader.
        make: ReaderFactory,
        /// The source's counters (shared by all its readers).
        metrics: Arc<Metrics>,
    },
    /// A source with one shared reader that a stream joins after reading, with a backfill
    /// reader of its own, what the shared one read before the stream started.
    CatchUp {
        /// The source.
        def: Box<SourceDef>,
        /// Makes the stream's backfill reader.
        backfill: ReaderFactory,
        /// The source's reader takes part in checkpoints (so can the stream).
        checkpointed: bool,
    },
}

impl Input {
    /// Whether a stream or sink reading this input can take part in checkpoints: its
    /// input replays from a checkpoint's position after a restart.
    pub fn checkpointed(&self) -> bool {
        match self {
            Input::Hub { checkpointed, .. } | Input::CatchUp { checkpointed, .. } => *checkpointed,
            Input::Reader { .. } => false,
        }
    }
}

/// A reader of a pull source for one stream, not started yet: every branch of the stream
/// that reads the source subscribes to `output` before the reader starts, so all of them see
/// every row.
struct PendingReader {
    output: FanOut,
    /// The source's `idle_timeout`.
    idle_timeout: Option<Duration>,
    reader: Box<dyn sluice_engine::SourceReader>,
    ctx: SourceContext,
}

impl PendingReader {
    /// A reader of `input` (`None` for inputs read through a hub).
    fn of(lake: &Lake, input: &Input, cancel: &CancellationToken) -> Result<Option<Self>> {
        Ok(match input {
            Input::Hub { .. } => None,
            Input::Reader { def, make, metrics } => Some(Self::new(
                lake,
                def,
                make.reader(),
                Arc::clone(metrics),
                cancel,
            )),
            // Its own counters: the source's count what the shared reader reads.
            Input::CatchUp { def, backfill, .. } => Some(Self::new(
                lake,
                def,
                backfill.reader(),
                Arc::default(),
                cancel,
            )),
        })
    }

    fn new(
        lake: &Lake,
        def: &SourceDef,
        reader: Box<dyn sluice_engine::SourceReader>,
        metrics: Arc<Metrics>,
        cancel: &CancellationToken,
    ) -> Self {
        let output = FanOut::new(def.name.as_str());
        let ctx = SourceContext {
            output: output.clone(),
            metrics,
            bad_records: errors_channel(lake, &def.name),
            cancel: cancel.clone(),
            watermark: def.watermark.clone(),
            checkpoint: None,
        };
        Self {
            output,
            idle_timeout: def.watermark.as_ref().and_then(|w| w.idle_timeout),
            reader,
            ctx,
        }
    }

    /// Starts the reader once `gate` is open.
    fn start(self, mut gate: Gate) -> JoinHandle<sluice_engine::Result<()>> {
        let Self {
            output,
            reader,
            ctx,
            ..
        } = self;
        tokio::spawn(async move {
            // Closed only while the catalog is restored at startup: a restored stream must
            // not produce before the streams reading it have subscribed again.
            let _ = gate.wait_for(|open| *open).await;
            let result = reader.run(ctx).await;
            match &result {
                Ok(()) => {
                    output.send(Message::End).await;
                }
                // The stream must not take a failure for the end of its input.
                Err(e) => output.abort(e.to_string()),
            }
            result
        })
    }
}

/// How often a stream checkpoints: its `checkpoint_interval`, else the server's default but
/// at least as often as its files roll (they become visible at checkpoints). `None`: off.
fn checkpoint_interval(plan: &StreamPlan, default: Duration) -> Option<Duration> {
    match plan.checkpoint_interval {
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
        None => Some(default.min(plan.writer.rollover_interval)),
    }
}

/// Opened once readers may start (see `PendingReader::start`).
pub type Gate = tokio::sync::watch::Receiver<bool>;

/// What a stream runs within: the server's shutdown, checkpoints, readers' gate, and what
/// hears of its completed partitions.
pub struct StreamEnv<'a> {
    /// Cancelled when the server shuts down (the stream's token is a child of it).
    pub parent: &'a CancellationToken,
    /// The checkpoint coordinator, if streams checkpoint.
    pub coordinator: Option<&'a Coordinator>,
    /// Opened once readers may start.
    pub gate: &'a Gate,
    /// Called when one of the stream's hour partitions is compacted and marked complete.
    pub on_final: Option<OnFinal>,
}

/// Starts a stream's tasks. `input` resolves a source or stream name to what the stream
/// reads from it. With a `coordinator`, a stream whose every input can replay from a
/// checkpoint (readers that keep positions, streams that checkpoint) and whose operators can
/// snapshot their state takes part in checkpoints, resuming from the last one.
pub async fn start_stream(
    lake: &Lake,
    create: CreateStream,
    plan: StreamPlan,
    input: impl Fn(&str) -> Option<Input>,
    env: StreamEnv<'_>,
) -> Result<RunningStream> {
    let StreamEnv {
        parent,
        coordinator,
        gate,
        on_final,
    } = env;
    let name = plan.name.clone();
    let origin = format!("stream {name}");
    let spec = plan.pipeline(&origin);
    let cancel = parent.child_token();
    // Each branch's subscription, in branch order, taken by the builder below.
    let mut inputs = Vec::with_capacity(plan.branches.len());
    // One reader per pull source, shared by the branches that read it (a self-union),
    // started once every branch has subscribed.
    let mut pending: std::collections::BTreeMap<String, PendingReader> = Default::default();
    let mut replayable = true;
    let mut backfills = vec![];
    for b in &spec.branches {
        let Some(input) = input(&b.input) else {
            cancel.cancel();
            return Err(ServerError::Internal(format!(
                "stream `{name}` reads `{}`, which is not running",
                b.input
            )));
        };
        // (A reader of its own replays if it can keep positions: checked below.)
        replayable &= matches!(input, Input::Reader { .. }) || input.checkpointed();
        inputs.push(match input {
            Input::Hub {
                hub, idle_timeout, ..
            } => (hub.subscribe(DEFAULT_CHANNEL_CAPACITY), idle_timeout),
            input => {
                let reader = match pending.entry(b.input.clone()) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => {
                        let reader =
                            PendingReader::of(lake, &input, &cancel)?.ok_or_else(|| {
                                ServerError::Internal(format!("`{}` has no reader", b.input))
                            })?;
                        if matches!(input, Input::CatchUp { .. }) {
                            backfills.push((b.input.clone(), Arc::clone(&reader.ctx.metrics)));
                        }
                        e.insert(reader)
                    }
                };
                (
                    reader.output.subscribe(DEFAULT_CHANNEL_CAPACITY),
                    reader.idle_timeout,
                )
            }
        });
    }
    let parallelism = spec.parallelism;
    replayable &= pending.values().all(|r| r.reader.checkpointable()) && spec.checkpointable()?;
    let interval = coordinator
        .and_then(|c| checkpoint_interval(&plan, c.default_interval()))
        .filter(|_| replayable);
    let mut checkpoints = match (coordinator, interval) {
        (Some(c), Some(interval)) => Some(
            c.register(StreamRegistration {
                name: name.clone(),
                sql: create.to_string(),
                readers: pending.keys().cloned().collect(),
                parallelism,
                writer: true,
                interval,
                timeout: plan.checkpoint_timeout,
            })
            .await?,
        ),
        _ => None,
    };
    let metrics: Arc<Metrics> = Arc::default();
    let restored = checkpoints.as_mut().and_then(|c| c.restored.take());
    if let Some(restored) = &restored {
        tracing::info!(stream = %name, epoch = restored.epoch, from_parallelism = restored.parallelism, parallelism, "resuming from checkpoint");
        // Counters, and the watermark, go on from where the checkpoint was.
        metrics.restore_counters(&restored.counters);
        for (source, reader) in pending.iter_mut() {
            if let Some(position) = restored.positions.get(source) {
                reader.reader.restore(position)?;
            }
        }
    }
    if let Some(c) = checkpoints.as_mut() {
        for (source, reader) in pending.iter_mut() {
            reader.ctx.checkpoint = c.readers.remove(source);
        }
    }
    let checkpointed = checkpoints.is_some();
    let readers: Vec<_> = pending
        .into_values()
        .map(|r| r.start(gate.clone()))
        .collect();
    let fanout = FanOut::new(name.as_str());
    let files_written = Arc::new(AtomicU64::new(0));
    let status: SharedStatus = Arc::new(Mutex::new(Status::Running));
    let sink_input = fanout.subscribe(DEFAULT_CHANNEL_CAPACITY);
    let mut writer = ParquetLakeWriter::new(
        lake.clone(),
        name.clone(),
        &plan.output_schema,
        plan.event_time_column.as_deref(),
        plan.writer.clone(),
        Arc::clone(&files_written),
    );
    let mut subtask_checkpoints = vec![];
    let compactions: Arc<CompactionCounts> = Arc::default();
    if let Some(c) = checkpoints {
        writer = writer
            .with_checkpoints(c.writer, cancel.clone())
            .with_compaction(on_final, Arc::clone(&compactions));
        subtask_checkpoints = c.subtasks;
    }
    let mut inputs = inputs.into_iter();
    let task = spec.build(
        |_| {
            inputs.next().ok_or_else(|| {
                sluice_engine::EngineError::Internal("a branch without input".into())
            })
        },
        TaskWiring {
            output: fanout.clone(),
            metrics: Arc::clone(&metrics),
            bad_records: errors_channel(lake, &name),
            cancel: cancel.clone(),
            checkpoints: subtask_checkpoints,
            restored: restored.as_ref().map(|r| r.operators.as_slice()),
        },
    )?;
    let done = {
        let status = Arc::clone(&status);
        let cancel = cancel.clone();
        let coordinator = coordinator.filter(|_| checkpointed).cloned();
        tokio::spawn(async move {
            let task = tokio::spawn(task.run());
            let sink = tokio::spawn(run_sink(sink_input, Box::new(writer)));
            // The sink ends after the stream sends `End`, or early if it fails: then the
            // stream must stop too, or its rows would go nowhere.
            let sink_result = sink.await;
            let sink_status = outcome(&name, sink_result);
            if sink_status != Status::Finished {
                cancel.cancel();
            }
            // The first failure says why: a reader's (the stream and its writer only saw
            // their input cut short), the stream's (its writer saw that), or the writer's
            // (the stream was cancelled then).
            let task_status = outcome(&name, task.await);
            let mut final_status = Status::Finished;
            for r in readers {
                let reader_status = outcome(&name, r.await);
                if final_status == Status::Finished {
                    final_status = reader_status;
                }
            }
            for status in [task_status, sink_status] {
                if final_status == Status::Finished {
                    final_status = status;
                }
            }
            match (&coordinator, &final_status) {
                (Some(c), Status::Failed(_)) => {
                    // Its last checkpoint stays: a restart resumes it from there.
                    c.deregister(&name, true);
                }
                (Some(c), Status::Finished) if !cancel.is_cancelled() => {
                    // Finished means written: its last files are visible once committed.
                    let committed =
                        tokio::time::timeout(Duration::from_secs(60), c.checkpoint_now()).await;
                    if committed.is_err() {
                        tracing::warn!(stream = %name, "its last files are not committed yet");
                    }
                }
                _ => {}
            }
            set(&status, final_status);
        })
    };
    Ok(RunningStream {
        create,
        plan,
        fanout,
        metrics,
        files_written,
        compactions,
        status,
        cancel,
        checkpointed,
        checkpoint_interval: interval.filter(|_| checkpointed),
        backfills,
        done: Some(done),
    })
}

fn outcome(
    name: &str,
    r: std::result::Result<sluice_engine::Result<()>, tokio::task::JoinError>,
) -> Status {
    match r {
        Ok(Ok(())) => Status::Finished,
        Ok(Err(e)) => {
            tracing::error!(name, error = %e, "pipeline failed");
            Status::Failed(e.to_string())
        }
        Err(e) => {
            tracing::error!(name, error = %e, "pipeline task panicked");
            Status::Failed(format!("internal error (this is a bug in Sluice): {e}"))
        }
    }
}

/// Stops a running object and waits (up to `timeout`) for its tasks to flush and end.
pub async fn stop(cancel: &CancellationToken, done: Option<JoinHandle<()>>, timeout: Duration) {
    cancel.cancel();
    if let Some(done) = done
        && tokio::time::timeout(timeout, done).await.is_err()
    {
        tracing::warn!("a pipeline did not stop within {timeout:?}");
    }
}

impl RunningSource {
    /// Stops the source: its hub ends (its readers belong to, and stop with, the streams).
    pub async fn stop(self, timeout: Duration) {
        self.fanout.send(Message::End).await;
        stop(&self.cancel, None, timeout).await;
    }

    /// What a stream reading this source subscribes to.
    pub fn input(&self) -> Input {
        if let Some(backfill) = &self.backfill {
            return Input::CatchUp {
                def: Box::new(self.def.clone()),
                backfill: backfill.clone(),
                checkpointed: self.checkpointed,
            };
        }
        match &self.per_stream {
            Some(make) => Input::Reader {
                def: Box::new(self.def.clone()),
                make: make.clone(),
                metrics: Arc::clone(&self.metrics),
            },
            None => Input::Hub {
                hub: self.fanout.clone(),
                idle_timeout: self.def.watermark.as_ref().and_then(|w| w.idle_timeout),
                checkpointed: self.checkpointed,
            },
        }
    }
}

impl RunningStream {
    /// Stops the stream, waiting until its open files are written.
    pub async fn stop(mut self, timeout: Duration) {
        stop(&self.cancel, self.done.take(), timeout).await;
    }
}

/// A running sink.
#[derive(Debug)]
pub struct RunningSink {
    /// The statement that made it.
    pub create: CreateSink,
    /// Its connector configuration.
    pub config: Arc<dyn SinkSpec>,
    /// Its state.
    pub status: SharedStatus,
    /// Rows delivered (acknowledged by the destination; with exactly-once delivery, rows
    /// whose epoch's transaction is committed).
    pub delivered: Arc<AtomicU64>,
    /// It delivers exactly once (rows travel with checkpoints).
    pub exactly_once: bool,
    cancel: CancellationToken,
    done: Option<JoinHandle<()>>,
}

/// Counts the rows a connector's sink accepted (`delivered`: unless the connector counts
/// them itself); with `checkpoint`, reports each barrier once everything before it is
/// acknowledged (connectors' `write_batch` returns then).
struct Counted {
    inner: Box<dyn sluice_engine::Sink>,
    /// The sink's `WHERE`: only rows it holds for are delivered.
    filter: Option<Arc<dyn datafusion::physical_plan::PhysicalExpr>>,
    delivered: Option<Arc<AtomicU64>>,
    checkpoint: Option<CheckpointHandle>,
}

/// A sink's `WHERE` predicate over its input's rows (`schema`), ready to evaluate.
pub fn row_filter(
    predicate: &datafusion::sql::sqlparser::ast::Expr,
    schema: &arrow::datatypes::SchemaRef,
) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::PhysicalExpr>> {
    let ctx = datafusion::prelude::SessionContext::new();
    let df_schema = datafusion::common::DFSchema::try_from(schema.as_ref().clone())?;
    let logical = ctx.parse_sql_expr(&predicate.to_string(), &df_schema)?;
    let physical = ctx.create_physical_expr(logical, &df_schema)?;
    let t = physical.data_type(schema)?;
    if t != arrow::datatypes::DataType::Boolean {
        return Err(datafusion::error::DataFusionError::Plan(format!(
            "the condition must be boolean, not {t}"
        )));
    }
    Ok(physical)
}

/// The rows of `batch` `filter` holds for (NULL: not).
fn apply_filter(
    filter: &dyn datafusion::physical_plan::PhysicalExpr,
    batch: &arrow::record_batch::RecordBatch,
) -> datafusion::error::Result<arrow::record_batch::RecordBatch> {
    let mask = filter.evaluate(batch)?.into_array(batch.num_rows())?;
    let mask = arrow::array::AsArray::as_boolean_opt(mask.as_ref()).ok_or_else(|| {
        datafusion::error::DataFusionError::Internal("a filter that is not boolean".into())
    })?;
    Ok(arrow::compute::filter_record_batch(batch, mask)?)
}

/// A report with nothing staged: what a sink that delivers as it goes tells a checkpoint.
fn nothing_staged() -> Payload {
    Payload::Staged {
        files: vec![],
        published: Arc::default(),
    }
}

#[async_trait::async_trait]
impl sluice_engine::Sink for Counted {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn write_batch(
        &mut self,
        batch: arrow::record_batch::RecordBatch,
    ) -> sluice_engine::Result<()> {
        let batch = match &self.filter {
            Some(f) => {
                let batch = apply_filter(f.as_ref(), &batch)?;
                if batch.num_rows() == 0 {
                    return Ok(());
                }
                batch
            }
            None => batch,
        };
        let n = batch.num_rows() as u64;
        self.inner.write_batch(batch).await?;
        if let Some(delivered) = &self.delivered {
            delivered.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }
    async fn on_watermark(&mut self, t: sluice_engine::EventTime) -> sluice_engine::Result<()> {
        self.inner.on_watermark(t).await
    }
    async fn on_barrier(&mut self, b: sluice_engine::Barrier) -> sluice_engine::Result<()> {
        let report = self.checkpoint.as_ref().and_then(|h| h.on_barrier(b));
        self.inner.on_barrier(b).await?;
        if let Some(report) = report {
            report.report(nothing_staged());
        }
        Ok(())
    }
    fn tick_interval(&self) -> Option<Duration> {
        self.inner.tick_interval()
    }
    async fn on_tick(&mut self) -> sluice_engine::Result<()> {
        self.inner.on_tick().await
    }
    async fn close(&mut self) -> sluice_engine::Result<()> {
        self.inner.close().await?;
        if let Some(h) = self.checkpoint.take() {
            h.finish(nothing_staged());
        }
        Ok(())
    }
    async fn abort(&mut self) -> sluice_engine::Result<()> {
        // Not finished: checkpoints stop counting on it once it fails.
        self.inner.abort().await
    }
}

/// How often a sink asks for checkpoints: never by itself (it follows the epochs of its
/// input stream).
const SINK_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Starts a sink delivering what `input` (the source or stream it reads) produces.
///
/// Given `checkpoints` (the coordinator, and whether to deliver exactly once: the input is
/// a stream that checkpoints) the sink takes part in them: exactly once, its rows travel
/// with the checkpoints; otherwise a checkpoint
/// completes only once the sink has had every row before its barrier acknowledged, so a
/// restart replays whatever it may not have delivered (at least once). Given `filter` (the
/// sink's `WHERE`, with the policies of its owner) it delivers only the rows that pass.
// One argument per thing a sink is made of; a struct of them would only rename this list.
#[allow(clippy::too_many_arguments)]
pub async fn start_sink(
    lake: &Lake,
    create: CreateSink,
    config: Arc<dyn SinkSpec>,
    input: Input,
    parent: &CancellationToken,
    gate: &Gate,
    checkpoints: Option<(&Coordinator, bool)>,
    filter: Option<Arc<dyn datafusion::physical_plan::PhysicalExpr>>,
) -> Result<RunningSink> {
    let coordinator = checkpoints.map(|(c, _)| c);
    let exactly_once = checkpoints.is_some_and(|(_, e)| e);
    let cancel = parent.child_token();
    let delivered = Arc::new(AtomicU64::new(0));
    // Subscribe before registering: no barrier of an epoch the sink takes part in is missed.
    let (subscription, mut reader) = match &input {
        Input::Hub { hub, .. } => (hub.subscribe(DEFAULT_CHANNEL_CAPACITY), None),
        _ => {
            let reader = PendingReader::of(lake, &input, &cancel)?
                .ok_or_else(|| ServerError::Internal(format!("`{}` has no reader", create.from)))?;
            let subscription = reader.output.subscribe(DEFAULT_CHANNEL_CAPACITY);
            (subscription, Some(reader))
        }
    };
    // A backfill reader keeps its position in the sink's checkpoints, and resumes there.
    let backfills = matches!(input, Input::CatchUp { .. });
    let registered = match coordinator {
        Some(c) => {
            let mut registered = c
                .register(StreamRegistration {
                    name: create.name.clone(),
                    sql: create.to_string(),
                    readers: backfills.then(|| create.from.clone()).into_iter().collect(),
                    parallelism: 0,
                    writer: true,
                    interval: SINK_CHECKPOINT_INTERVAL,
                    timeout: None,
                })
                .await?;
            if let Some(r) = reader.as_mut().filter(|_| backfills) {
                r.ctx.checkpoint = registered.readers.remove(&create.from);
                let restored = registered.restored.as_ref();
                if let Some(position) = restored.and_then(|x| x.positions.get(&create.from))
                    && let Err(e) = r.reader.restore(position)
                {
                    c.deregister(&create.name, true);
                    return Err(e.into());
                }
            }
            Some((c, registered.writer))
        }
        None => None,
    };
    let (checkpoint, acknowledged) = match registered {
        Some((c, handle)) if exactly_once => (
            Some(sluice_engine::checkpoint::SinkCheckpoint {
                store: Arc::new(lake.clone()),
                commits: c.commit_watch(),
                handle,
                delivered: Arc::clone(&delivered),
            }),
            None,
        ),
        Some((_, handle)) => (None, Some(handle)),
        None => (None, None),
    };
    let exactly_once = checkpoint.is_some();
    let inner = match config.open(&create.name, checkpoint) {
        Ok(s) => s,
        Err(e) => {
            if let Some(c) = coordinator {
                c.deregister(&create.name, true);
            }
            return Err(e.into());
        }
    };
    let sink: Box<dyn sluice_engine::Sink> = Box::new(Counted {
        inner,
        filter,
        // Exactly once, the connector counts: its rows are delivered after their checkpoint.
        delivered: (!exactly_once).then(|| Arc::clone(&delivered)),
        checkpoint: acknowledged,
    });
    let reader = reader.map(|r| r.start(gate.clone()));
    let coordinator = coordinator.cloned();
    let status: SharedStatus = Arc::new(Mutex::new(Status::Running));
    let done = {
        let status = Arc::clone(&status);
        let cancel = cancel.clone();
        let name = create.name.clone();
        tokio::spawn(async move {
            let result = tokio::select! {
                r = run_sink(subscription, sink) => r,
                _ = cancel.cancelled() => Ok(()),
            };
            cancel.cancel(); // stops its reader, if it has one
            if let Some(reader) = reader {
                let _ = reader.await;
            }
            *status.lock().unwrap_or_else(|e| e.into_inner()) = match result {
                Ok(()) => Status::Finished,
                Err(e) => {
                    tracing::error!(sink = %name, error = %e, "sink failed");
                    if let Some(c) = &coordinator {
                        // Checkpoints go on without it; a restart delivers what it owes.
                        c.deregister(&name, true);
                    }
                    Status::Failed(e.to_string())
                }
            };
        })
    };
    Ok(RunningSink {
        create,
        config,
        exactly_once,
        status,
        delivered,
        cancel,
        done: Some(done),
    })
}

/// Deletes what an exactly-once sink still owed (`DROP SINK`).
pub async fn forget_sink(lake: &Lake, name: &str) {
    if let Err(e) = lake
        .remove_dir(
            sluice_connectors::lake::Zone::Internal,
            &format!("sinks/{name}"),
        )
        .await
    {
        tracing::warn!(sink = %name, "cannot delete what it still owed: {e}");
    }
}

impl RunningSink {
    /// Stops the sink at once (`DROP SINK`).
    pub async fn stop(mut self, timeout: Duration) {
        stop(&self.cancel, self.done.take(), timeout).await;
    }

    /// Lets the sink deliver what is still coming (its input is ending), then stops it.
    pub async fn drain(mut self, timeout: Duration) {
        if let Some(done) = self.done.take()
            && tokio::time::timeout(timeout, done).await.is_err()
        {
            tracing::warn!(sink = %self.create.name, "the sink did not finish within {timeout:?}");
        }
        self.cancel.cancel();
    }
}
