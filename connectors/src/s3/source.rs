//! [`LandingReader`]: objects landing under an S3 prefix → batches, each object once.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use async_compression::tokio::bufread::GzipDecoder;
use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use sluice_engine::{BadRecord, EngineError, SourceContext, SourceReader};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

use super::{FileFormat, LandedObject, LandingConfig, created_objects};
use crate::formats::csv::CsvDecoder;
use crate::formats::{Decoder, RecordFormat};
use crate::ingest::{Ingest, Lines, Rejects};
use crate::lake::{Lake, RecordZone, Zone, unique_file_name};
use crate::split_clock::{ClockState, OneSplit, resend_watermark};
use sluice_engine::checkpoint::{ReaderCheckpoint, StagedFile};

/// Reads the landing zone of one source. See the module docs.
pub struct LandingReader {
    name: String,
    config: LandingConfig,
    schema: SchemaRef,
    lake: Lake,
    /// The event time it had at the checkpoint it resumes from.
    resume_clock: ClockState,
}

/// Why an object could not be ingested: it is unreadable (it goes to the errors zone whole)
/// or the failure is outside it (the store, the pipeline): retried later.
enum ObjectError {
    Unreadable(String),
    Engine(EngineError),
}

impl From<EngineError> for ObjectError {
    fn from(e: EngineError) -> Self {
        ObjectError::Engine(e)
    }
}

/// What the reader knows while it runs.
struct Ingestion<'a> {
    ctx: &'a SourceContext,
    store: Arc<dyn ObjectStore>,
    done: HashSet<LandedObject>,
    /// Decoding, rejects, event time.
    ingest: Ingest<OneSplit>,
    /// With checkpoints: barriers go out between objects, and what records progress (the
    /// objects' markers, errors-zone files) is staged and committed with the epoch.
    checkpoint: Option<ReaderCheckpoint>,
    /// The errors zone: staged with checkpoints.
    errors: RecordZone,
    /// Markers of objects ingested in the current epoch (with checkpoints).
    markers: Vec<StagedFile>,
    /// SQS messages whose objects are ingested, not yet covered by a barrier.
    handles: Vec<String>,
    /// SQS messages to delete once the epoch that covers them is committed.
    to_delete: BTreeMap<u64, Vec<String>>,
    /// Committed epochs, as they happen.
    committed: Option<tokio::sync::watch::Receiver<u64>>,
}

impl LandingReader {
    /// The reader of source `name` producing `schema`; its state lives in `lake`.
    pub fn new(
        name: impl Into<String>,
        config: LandingConfig,
        schema: SchemaRef,
        lake: Lake,
    ) -> Self {
        Self {
            name: name.into(),
            config,
            schema,
            lake,
            resume_clock: ClockState::default(),
        }
    }

    fn failed(&self, what: impl std::fmt::Display) -> EngineError {
        EngineError::external(
            format!("s3 source `{}`", self.name),
            std::io::Error::other(what.to_string()),
        )
    }

    /// Where the ingested objects are recorded.
    fn state_dir(&self) -> Path {
        self.lake
            .dir(Zone::Internal, "sources")
            .join(self.name.as_str())
            .join("objects")
    }

    /// The objects ingested before (recorded in the lake).
    async fn load_done(&self) -> sluice_engine::Result<HashSet<LandedObject>> {
        let store = self.lake.store();
        let dir = self.state_dir();
        let files: Vec<_> = store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| self.failed(e))?;
        let mut done = HashSet::new();
        for f in files {
            let bytes = self
                .lake
                .get_opt(&f.location)
                .await
                .map_err(|e| self.failed(e))?
                .unwrap_or_default();
            let o: LandedObject = serde_json::from_slice(&bytes)
                .map_err(|e| self.failed(format!("{}: {e}", f.location)))?;
            done.insert(o);
        }
        Ok(done)
    }

    /// Records `object` as ingested: durable when this returns, or (with checkpoints)
    /// staged, and committed with the epoch whose rows it covers.
    async fn record_done(
        &self,
        ing: &mut Ingestion<'_>,
        object: &LandedObject,
    ) -> sluice_engine::Result<()> {
        let file = unique_file_name("json");
        let path = self.state_dir().join(file.as_str());
        let body = serde_json::to_vec(object).expect("serialising strings cannot fail");
        if ing.checkpoint.is_none() {
            return self.lake.put(&path, body).await.map_err(|e| self.failed(e));
        }
        let staged = self
            .lake
            .dir(Zone::Internal, "staging")
            .join("sources")
            .join(self.name.as_str())
            .join(file.as_str());
        self.lake
            .put(&staged, body)
            .await
            .map_err(|e| self.failed(e))?;
        ing.markers.push(StagedFile::new(
            self.lake.relative(&staged),
            self.lake.relative(&path),
        ));
        Ok(())
    }

    /// Sends the barrier of `epoch` with what the epoch staged; the SQS messages handled so
    /// far are deleted once it is committed.
    async fn barrier(&self, ing: &mut Ingestion<'_>, epoch: u64) {
        let Some(ck) = &mut ing.checkpoint else {
            return;
        };
        let mut files = std::mem::take(&mut ing.markers);
        files.extend(ing.errors.take_staged());
        ck.staged(epoch, files);
        let mut position = serde_json::json!({});
        ing.ingest.clock_state().write_into(&mut position);
        ck.barrier(&ing.ctx.output, epoch, position).await;
        let handles = std::mem::take(&mut ing.handles);
        if !handles.is_empty() {
            ing.to_delete.insert(epoch, handles);
        }
    }

    /// Deletes the SQS messages whose objects a committed checkpoint covers.
    async fn delete_committed(
        &self,
        ing: &mut Ingestion<'_>,
        sqs: &aws_sdk_sqs::Client,
        queue: &str,
    ) {
        let Some(committed) = ing.committed.as_ref().map(|c| *c.borrow()) else {
            return;
        };
        let later = ing.to_delete.split_off(&(committed + 1));
        let done = std::mem::replace(&mut ing.to_delete, later);
        for handle in done.into_values().flatten() {
            if let Err(e) = sqs
                .delete_message()
                .queue_url(queue)
                .receipt_handle(&handle)
                .send()
                .await
            {
                // Delivered again later; the objects are recorded, so skipped then.
                tracing::warn!(source = %self.name, "sqs DeleteMessage: {}", aws_sdk_sqs::error::DisplayErrorContext(&e));
            }
        }
    }

    /// Sends a barrier if one is due.
    async fn barrier_if_due(&self, ing: &mut Ingestion<'_>) {
        if let Some(epoch) = ing.checkpoint.as_ref().and_then(ReaderCheckpoint::due) {
            self.barrier(ing, epoch).await;
        }
    }

    /// The objects under the prefix, in key order.
    async fn list(&self, store: &dyn ObjectStore) -> sluice_engine::Result<Vec<LandedObject>> {
        let prefix = Path::from(self.config.prefix.trim_end_matches('/'));
        let prefix = (!self.config.prefix.is_empty()).then_some(prefix);
        let mut objects: Vec<LandedObject> = store
            .list(prefix.as_ref())
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| self.failed(e))?
            .into_iter()
            .filter(|m| m.size > 0)
            .map(|m| LandedObject {
                bucket: self.config.bucket.clone(),
                key: m.location.to_string(),
                etag: m.e_tag.unwrap_or_default().trim_matches('"').to_string(),
            })
            .collect();
        objects.sort();
        Ok(objects)
    }

    /// Ingests `object` unless it was before; records it.
    async fn ingest(
        &self,
        ing: &mut Ingestion<'_>,
        object: LandedObject,
    ) -> sluice_engine::Result<()> {
        if object.bucket != self.config.bucket
            || !object.key.starts_with(&self.config.prefix)
            || ing.done.contains(&object)
        {
            return Ok(());
        }
        self.barrier_if_due(ing).await;
        // Rows published to nobody would be lost: wait for a stream.
        tokio::select! {
            _ = ing.ctx.cancel.cancelled() => return Ok(()),
            _ = ing.ctx.output.wait_for_subscriber() => {}
        }
        let origin = format!("s3://{}/{}", object.bucket, object.key);
        tracing::info!(source = %self.name, object = %origin, "s3: ingesting");
        let read = match self.config.format {
            FileFormat::Parquet => self.read_parquet(ing, &object).await,
            FileFormat::Json | FileFormat::Csv => self.read_lines(ing, &object, &origin).await,
        };
        match read {
            Ok(()) => {}
            Err(ObjectError::Engine(e)) => return Err(e),
            Err(ObjectError::Unreadable(reason)) => {
                tracing::warn!(source = %self.name, object = %origin, "s3: unreadable: {reason}");
                let copy = self.keep_unreadable(ing, &object).await?;
                let bad = vec![BadRecord {
                    payload: String::new(),
                    payload_base64: false,
                    reason: format!("unreadable object: {reason} (kept as {copy})"),
                    origin,
                }];
                ing.ingest.reject_records(ing.ctx, bad).await?;
            }
        }
        self.record_done(ing, &object).await?;
        ing.done.insert(object);
        Ok(())
    }

    /// Copies an unreadable object into the errors zone, whole; its path there.
    async fn keep_unreadable(
        &self,
        ing: &Ingestion<'_>,
        object: &LandedObject,
    ) -> sluice_engine::Result<Path> {
        let bytes = ing
            .store
            .get(&Path::from(object.key.as_str()))
            .await
            .map_err(|e| self.failed(e))?
            .bytes()
            .await
            .map_err(|e| self.failed(e))?;
        let base = object.key.rsplit('/').next().unwrap_or("object");
        ing.errors
            .put_raw(bytes, base)
            .await
            .map_err(|e| self.failed(e))
    }

    /// JSON lines or CSV (gzip or not), streamed line by line, decoded `batch_size` lines at
    /// a time.
    async fn read_lines(
        &self,
        ing: &mut Ingestion<'_>,
        object: &LandedObject,
        origin: &str,
    ) -> Result<(), ObjectError> {
        let got = ing
            .store
            .get(&Path::from(object.key.as_str()))
            .await
            .map_err(|e| ObjectError::Engine(self.failed(e)))?;
        let body =
            tokio_util::io::StreamReader::new(got.into_stream().map_err(std::io::Error::other));
        let mut raw = BufReader::new(body);
        let head = raw
            .fill_buf()
            .await
            .map_err(|e| ObjectError::Unreadable(e.to_string()))?;
        let gzip = head.starts_with(&[0x1f, 0x8b]) || object.key.ends_with(".gz");
        let mut lines: Box<dyn AsyncBufRead + Send + Unpin> = if gzip {
            Box::new(BufReader::new(GzipDecoder::new(raw)))
        } else {
            Box::new(raw)
        };
        // CSV: columns by the names in the header line.
        let mut header_read = self.config.format != FileFormat::Csv;
        // (line number, line): blank lines are skipped, so the numbers are kept.
        let mut batch: Vec<(usize, Vec<u8>)> = Vec::with_capacity(self.config.batch_size);
        let mut line_no = 0;
        loop {
            let mut line = Vec::new();
            let n = lines.read_until(b'\n', &mut line).await.map_err(|e| {
                ObjectError::Unreadable(if line_no == 0 {
                    e.to_string()
                } else {
                    format!("after line {line_no}: {e}")
                })
            })?;
            if n == 0 {
                break;
            }
            line_no += 1;
            while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                line.pop();
            }
            if !header_read {
                let csv = CsvDecoder::with_header(&self.schema, &line)
                    .map_err(ObjectError::Unreadable)?;
                ing.ingest.set_decoder(Decoder::Csv(csv));
                header_read = true;
                continue;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue; // blank lines carry nothing
            }
            batch.push((line_no, line));
            if batch.len() >= self.config.batch_size {
                self.publish_lines(ing, &batch, origin).await?;
                batch.clear();
            }
        }
        if !batch.is_empty() {
            self.publish_lines(ing, &batch, origin).await?;
        }
        Ok(())
    }

    /// Takes numbered lines through the ingest stage.
    async fn publish_lines(
        &self,
        ing: &mut Ingestion<'_>,
        lines: &[(usize, Vec<u8>)],
        origin: &str,
    ) -> Result<(), ObjectError> {
        let records: Vec<(usize, &[u8])> = lines.iter().map(|(n, l)| (*n, l.as_slice())).collect();
        let received = Lines {
            records: &records,
            origin,
        };
        ing.ingest.ingest(ing.ctx, &received).await?;
        Ok(())
    }

    /// A Parquet object, streamed by row group; columns by name.
    async fn read_parquet(
        &self,
        ing: &mut Ingestion<'_>,
        object: &LandedObject,
    ) -> Result<(), ObjectError> {
        let path = Path::from(object.key.as_str());
        let size = ing
            .store
            .head(&path)
            .await
            .map_err(|e| ObjectError::Engine(self.failed(e)))?
            .size;
        let reader = ObjectFile {
            store: Arc::clone(&ing.store),
            path,
            size,
        };
        let builder = ParquetRecordBatchStreamBuilder::new(reader)
            .await
            .map_err(|e| ObjectError::Unreadable(e.to_string()))?
            .with_batch_size(self.config.batch_size);
        let mut stream = builder
            .build()
            .map_err(|e| ObjectError::Unreadable(e.to_string()))?;
        let origin = format!("s3://{}/{}", object.bucket, object.key);
        let mut row_base = 0;
        while let Some(batch) = stream.next().await {
            let batch =
                batch.map_err(|e| ObjectError::Unreadable(format!("after row {row_base}: {e}")))?;
            let n = batch.num_rows();
            let (rows, unfit) = crate::formats::fit(&self.schema, batch.clone())?;
            if !unfit.is_empty() {
                let bad: Vec<BadRecord> = unfit
                    .into_iter()
                    .map(|(row, reason)| BadRecord {
                        payload: sluice_engine::operators::row_to_json(&batch, row),
                        payload_base64: false,
                        reason,
                        origin: format!("{origin} row {}", row_base + row + 1),
                    })
                    .collect();
                ing.ingest.reject_records(ing.ctx, bad).await?;
            }
            ing.ingest.publish_rows(ing.ctx, OneSplit, rows).await;
            row_base += n;
        }
        Ok(())
    }
}

/// A Parquet object read by ranges (footer, then the column chunks), never whole.
///
/// Our own `AsyncFileReader` rather than parquet's `ParquetObjectReader`: parquet 59
/// deprecates that type and asks callers to implement `AsyncFileReader` over their store
/// directly (apache/arrow-rs#10308; its `parquet/examples/object_store.rs` is this shape).
struct ObjectFile {
    store: Arc<dyn ObjectStore>,
    path: Path,
    size: u64,
}

impl AsyncFileReader for ObjectFile {
    fn get_bytes(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> BoxFuture<'_, parquet::errors::Result<bytes::Bytes>> {
        Box::pin(async move {
            self.store
                .get_range(&self.path, range)
                .await
                .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
        })
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        Box::pin(async move {
            let size = self.size;
            let metadata = ParquetMetaDataReader::new()
                .load_and_finish(&mut *self, size)
                .await?;
            Ok(Arc::new(metadata))
        })
    }
}

#[async_trait]
impl SourceReader for LandingReader {
    /// Its progress is the objects' markers, staged and committed with each checkpoint.
    fn checkpointable(&self) -> bool {
        true
    }

    /// The committed markers are what was ingested; the position keeps the event time.
    fn restore(&mut self, position: &serde_json::Value) -> sluice_engine::Result<()> {
        self.resume_clock = ClockState::read_from(position).ok_or_else(|| {
            EngineError::Checkpoint(format!(
                "s3 source `{}`: position {position} has a malformed `event_time`",
                self.name
            ))
        })?;
        Ok(())
    }

    async fn run(self: Box<Self>, mut ctx: SourceContext) -> sluice_engine::Result<()> {
        let checkpoint = ctx.checkpoint.take();
        let mut errors = RecordZone::new(self.lake.clone(), Zone::Errors, self.name.as_str());
        if checkpoint.is_some() {
            errors = errors.staging();
        }
        let store: Arc<dyn ObjectStore> = Arc::new(
            self.config
                .aws
                .s3_store(&self.config.bucket)
                .map_err(|e| self.failed(e))?,
        );
        // JSON lines decode with the declared columns; a CSV object's decoder comes from its
        // header line.
        let mut ingest = Ingest::new(
            format!("s3 source `{}`", self.name),
            &RecordFormat::Json,
            Arc::clone(&self.schema),
            None,
        )?
        .with_rejects(match checkpoint {
            Some(_) => Rejects::Zone(Box::new(errors.clone())),
            None => Rejects::Context,
        });
        ingest.clock().add(OneSplit);
        ingest.clock().restore(&self.resume_clock);
        resend_watermark(&ctx, self.resume_clock.emitted).await;
        let mut ing = Ingestion {
            ctx: &ctx,
            store: Arc::clone(&store),
            done: self.load_done().await?,
            ingest,
            committed: checkpoint.as_ref().map(ReaderCheckpoint::committed_epochs),
            checkpoint,
            errors,
            markers: vec![],
            handles: vec![],
            to_delete: BTreeMap::new(),
        };
        let sqs = match &self.config.notifications {
            Some(_) => Some(aws_sdk_sqs::Client::new(
                &self.config.aws.sdk_config().await,
            )),
            None => None,
        };
        // What landed while nobody was reading.
        for object in self.list(store.as_ref()).await? {
            self.ingest(&mut ing, object).await?;
        }
        // Barriers in between do not put the next listing off.
        let mut next_listing = tokio::time::Instant::now() + self.config.poll_interval;
        loop {
            if ctx.cancel.is_cancelled() {
                return Ok(());
            }
            match (&sqs, &self.config.notifications) {
                (Some(sqs), Some(queue)) => {
                    // A receive is never cut short (messages it took would stay invisible until
                    // their timeout): barriers go between receives, at most a second apart.
                    self.barrier_if_due(&mut ing).await;
                    self.delete_committed(&mut ing, sqs, queue).await;
                    let received = tokio::select! {
                        _ = ctx.cancel.cancelled() => return Ok(()),
                        r = sqs.receive_message().queue_url(queue).max_number_of_messages(10).wait_time_seconds(1).send() => r,
                    };
                    let received = match received {
                        Ok(r) => r,
                        Err(e) => {
                            let text = aws_sdk_sqs::error::DisplayErrorContext(&e).to_string();
                            tracing::warn!(source = %self.name, "sqs ReceiveMessage: {text}; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    };
                    for message in received.messages() {
                        let body = message.body().unwrap_or_default();
                        match created_objects(body) {
                            Ok(objects) => {
                                for object in objects {
                                    self.ingest(&mut ing, object).await?;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(source = %self.name, "s3 notification ignored: {e}")
                            }
                        }
                        // Only once its objects are ingested and recorded (a stop halfway
                        // leaves the message for later; the listing at start finds them too).
                        if ctx.cancel.is_cancelled() {
                            return Ok(());
                        }
                        // With checkpoints, once the epoch covering its objects is committed.
                        if let (Some(handle), Some(_)) = (message.receipt_handle(), &ing.checkpoint)
                        {
                            ing.handles.push(handle.to_string());
                            continue;
                        }
                        if let Some(handle) = message.receipt_handle()
                            && let Err(e) = sqs
                                .delete_message()
                                .queue_url(queue)
                                .receipt_handle(handle)
                                .send()
                                .await
                        {
                            // Delivered again later; the objects are recorded, so skipped then.
                            tracing::warn!(source = %self.name, "sqs DeleteMessage: {}", aws_sdk_sqs::error::DisplayErrorContext(&e));
                        }
                    }
                }
                _ => {
                    tokio::select! {
                        _ = ctx.cancel.cancelled() => return Ok(()),
                        epoch = sluice_engine::checkpoint::barrier_due(&mut ing.checkpoint) => {
                            self.barrier(&mut ing, epoch).await;
                            continue;
                        }
                        _ = tokio::time::sleep_until(next_listing) => {}
                    }
                    next_listing = tokio::time::Instant::now() + self.config.poll_interval;
                    for object in self.list(store.as_ref()).await? {
                        self.ingest(&mut ing, object).await?;
                    }
                }
            }
        }
    }
}
