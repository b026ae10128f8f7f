//! [`KafkaSink`]: rows of a stream or source → JSON or Avro records on a topic.
//!
//! ```sql
//! CREATE SINK revenue_out FROM revenue_10s
//! WITH (connector = 'kafka', brokers = '127.0.0.1:9092', topic = 'revenue',
//!       key = 'customer_id', format = 'json');
//! ```
//!
//! Each row becomes one record: its value the row as a JSON object or, with
//! `format = 'avro'`, as Avro in the Confluent wire format, the schema registered under
//! `<topic>-value` (see [`crate::formats::encoder`]); its key the `key` column as text (no key when the option is
//! absent or the value is NULL). Partitions are chosen by librdkafka's `murmur2_random` partitioner — the Java
//! client's default: `murmur2(key) % partitions` for keyed records, so keys land where other
//! producers put them and a key's records stay in order. The producer is idempotent with
//! `acks=all`; librdkafka retries with backoff. With `delivery = 'at_least_once'` a batch
//! counts as written only when every record of it is acknowledged, so what is acknowledged
//! upstream of the sink is on the topic (after a crash, some rows may be sent again). With
//! `delivery = 'exactly_once'` (the default when the input is a stream that checkpoints) rows
//! travel with the checkpoints and are sent in one transaction per epoch: see
//! `exactly_once.rs`.
//!
//! `header.<name> = '<column>'` adds a header `<name>` to each record carrying the column's
//! value (bytes for `BYTEA`, text otherwise; no header when NULL).
//!
//! Options: `brokers`, `topic` (required), `key`, `format` (`json` or `avro`),
//! `schema_registry` (with `avro`), `header.<name>`, `delivery`, `transactional_id` (with
//! exactly-once delivery; default `sluice-<sink>`), `properties.<name>`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, ArrayRef, AsArray, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Schema};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sluice_engine::{Barrier, EngineError, WithOptions};

use crate::error::{ConnectorError, Result};
use crate::formats::RecordFormat;
use crate::formats::encoder::RowEncoder;

use super::exactly_once::{DELIVERY_HEADER, EpochSink, SinkCheckpoint};

/// Validated options of a `kafka` sink.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaSinkConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// The topic written to.
    pub topic: String,
    /// The column whose value keys each record.
    pub key: Option<String>,
    /// How record values are encoded: JSON or Avro.
    pub format: RecordFormat,
    /// Record headers: (header name, the column whose value it carries).
    pub headers: Vec<(String, String)>,
    /// Extra librdkafka properties.
    pub properties: Vec<(String, String)>,
    /// The `delivery` option; `None`: exactly once when the input checkpoints.
    pub delivery: Option<Delivery>,
    /// With exactly-once delivery: the producer's `transactional.id` (default
    /// `sluice-<sink>`).
    pub transactional_id: Option<String>,
}

/// What a sink promises about each row it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Rows are sent as they come; after a crash some may be sent again.
    AtLeastOnce,
    /// Rows are sent once their checkpoint is durable, each exactly once.
    ExactlyOnce,
}

impl std::fmt::Display for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Delivery::AtLeastOnce => "at_least_once",
            Delivery::ExactlyOnce => "exactly_once",
        })
    }
}

impl KafkaSinkConfig {
    /// Takes the `kafka` sink options from `opts`, for rows of `schema`.
    pub fn try_new(opts: &mut WithOptions, schema: &Schema) -> Result<Self> {
        let brokers = opts.take_required("brokers")?;
        let topic = opts.take_required("topic")?;
        let format = crate::formats::take_format(opts, &["json", "avro"])?;
        let key = opts.take_str("key").map(|k| k.to_lowercase());
        let mut headers = opts.take_prefixed("header.");
        let no_column = |option: &str, column: &str| {
            let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            ConnectorError::InvalidConfig(format!(
                "{}: option `{option}`: there is no column `{column}` (columns: {})",
                opts.owner(),
                columns.join(", ")
            ))
        };
        if let Some(k) = &key
            && schema.field_with_name(k).is_err()
        {
            return Err(no_column("key", k));
        }
        for (name, column) in &mut headers {
            *column = column.to_lowercase();
            if schema.field_with_name(column).is_err() {
                return Err(no_column(&format!("header.{name}"), column));
            }
        }
        headers.sort();
        let delivery = match opts.take_str("delivery") {
            None => None,
            Some(d) => match d.to_ascii_lowercase().as_str() {
                "exactly_once" => Some(Delivery::ExactlyOnce),
                "at_least_once" => Some(Delivery::AtLeastOnce),
                other => {
                    return Err(ConnectorError::InvalidConfig(format!(
                        "{}: option `delivery`: '{other}' is not one of 'exactly_once', 'at_least_once'",
                        opts.owner()
                    )));
                }
            },
        };
        let transactional_id = opts.take_str("transactional_id");
        if transactional_id.is_some() && delivery == Some(Delivery::AtLeastOnce) {
            return Err(ConnectorError::InvalidConfig(format!(
                "{}: option `transactional_id` needs delivery = 'exactly_once'",
                opts.owner()
            )));
        }
        Ok(Self {
            delivery,
            transactional_id,
            brokers,
            topic,
            key,
            format,
            headers,
            properties: opts.take_prefixed("properties."),
        })
    }
}

/// Writes rows to a topic. See the module docs.
pub struct KafkaSink {
    name: String,
    mode: Mode,
}

enum Mode {
    /// Each batch is sent as it comes and counts as written once acknowledged.
    AtLeastOnce(Box<RecordWriter>),
    /// Rows are held per epoch and sent in a transaction once the epoch is committed.
    ExactlyOnce(EpochSink),
}

impl KafkaSink {
    /// A sink named `name` (for logs and errors) writing as `config` says, at least once.
    pub fn try_new(name: impl Into<String>, config: KafkaSinkConfig) -> Result<Self> {
        let name = name.into();
        let writer = RecordWriter::try_new(&name, config, None)?;
        Ok(Self {
            name,
            mode: Mode::AtLeastOnce(Box::new(writer)),
        })
    }

    /// A sink that delivers each row exactly once (see `kafka::exactly_once`): its rows are
    /// checkpointed with its input's epochs and sent in one Kafka transaction per epoch.
    pub fn exactly_once(
        name: impl Into<String>,
        config: KafkaSinkConfig,
        checkpoint: SinkCheckpoint,
    ) -> Result<Self> {
        let name = name.into();
        let transactional_id = config
            .transactional_id
            .clone()
            .unwrap_or_else(|| format!("sluice-{name}"));
        let writer = RecordWriter::try_new(&name, config, Some(&transactional_id))?;
        Ok(Self {
            mode: Mode::ExactlyOnce(EpochSink::start(&name, writer, checkpoint)),
            name,
        })
    }
}

/// Encodes rows and sends them as records: the part both delivery modes share.
pub(super) struct RecordWriter {
    pub(super) sink: String,
    pub(super) config: KafkaSinkConfig,
    pub(super) producer: FutureProducer,
    /// Rows → record values.
    encoder: RowEncoder,
}

impl RecordWriter {
    fn try_new(
        name: &str,
        config: KafkaSinkConfig,
        transactional_id: Option<&str>,
    ) -> Result<Self> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &config.brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            // The Java client's default partitioner for keyed records.
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "120000");
        if let Some(id) = transactional_id {
            cfg.set("transactional.id", id)
                .set("transaction.timeout.ms", "120000");
        }
        for (k, v) in &config.properties {
            cfg.set(k, v);
        }
        let producer = cfg.create().map_err(|e| {
            ConnectorError::InvalidConfig(format!("sink `{name}`: kafka producer: {e}"))
        })?;
        let encoder = RowEncoder::new(name, &config.topic, &config.format)?;
        Ok(Self {
            sink: name.to_string(),
            config,
            producer,
            encoder,
        })
    }

    pub(super) fn failed(&self, what: impl std::fmt::Display) -> EngineError {
        EngineError::external(
            format!("sink `{}` (kafka topic `{}`)", self.sink, self.config.topic),
            std::io::Error::other(what.to_string()),
        )
    }

    /// Sends `batch`'s rows and waits until every one is acknowledged. With `tag`, row `i`
    /// carries the header [`DELIVERY_HEADER`] = `<tag>/<i>`, and rows whose index is in
    /// `skip` are not sent (they are on the topic already).
    pub(super) async fn send(
        &mut self,
        batch: &RecordBatch,
        tag: Option<&str>,
        skip: &HashSet<u64>,
    ) -> sluice_engine::Result<()> {
        let values = self.encoder.encode(batch).await?;
        let keys: Option<StringArray> = match &self.config.key {
            Some(k) => {
                let column = batch
                    .column_by_name(k)
                    .ok_or_else(|| self.failed(format!("no column `{k}` in the rows")))?;
                let text = cast(column, &DataType::Utf8)?;
                Some(
                    text.as_any()
                        .downcast_ref::<StringArray>()
                        .expect("cast to Utf8")
                        .clone(),
                )
            }
            None => None,
        };
        // Header values as bytes: binary columns as they are, others as text.
        let mut headers = Vec::with_capacity(self.config.headers.len());
        for (name, column) in &self.config.headers {
            let column = batch
                .column_by_name(column)
                .ok_or_else(|| self.failed(format!("no column `{column}` in the rows")))?;
            let bytes: ArrayRef = match column.data_type() {
                DataType::Binary => Arc::clone(column),
                DataType::LargeBinary | DataType::BinaryView => cast(column, &DataType::Binary)?,
                _ => cast(&cast(column, &DataType::Utf8)?, &DataType::Binary)?,
            };
            headers.push((name.as_str(), bytes));
        }
        let mut deliveries = Vec::with_capacity(batch.num_rows());
        let mut ids = Vec::new();
        if let Some(tag) = tag {
            ids = (0..values.len()).map(|i| format!("{tag}/{i}")).collect();
        }
        for (i, value) in values.iter().enumerate() {
            if skip.contains(&(i as u64)) {
                continue;
            }
            let mut record =
                FutureRecord::<str, [u8]>::to(&self.config.topic).payload(value.as_ref());
            if let Some(keys) = &keys
                && keys.is_valid(i)
            {
                record = record.key(keys.value(i));
            }
            if !headers.is_empty() || tag.is_some() {
                let mut owned = OwnedHeaders::new_with_capacity(headers.len() + 1);
                for (name, values) in &headers {
                    let values = values.as_binary::<i32>();
                    if values.is_valid(i) {
                        owned = owned.insert(Header {
                            key: name,
                            value: Some(values.value(i)),
                        });
                    }
                }
                if let Some(id) = ids.get(i) {
                    owned = owned.insert(Header {
                        key: DELIVERY_HEADER,
                        value: Some(id.as_bytes()),
                    });
                }
                record = record.headers(owned);
            }
            // `send` waits (asynchronously) while the local queue is full.
            deliveries.push(self.producer.send(record, Duration::from_secs(60)));
        }
        for delivery in futures::future::join_all(deliveries).await {
            delivery.map_err(|(e, _)| self.failed(e))?;
        }
        Ok(())
    }

    /// Waits until everything sent is acknowledged.
    pub(super) async fn flush(&self) -> sluice_engine::Result<()> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(30)))
            .await
            .map_err(|e| EngineError::Internal(format!("kafka flush task: {e}")))?
            .map_err(|e| self.failed(e))
    }
}

#[async_trait]
impl sluice_engine::Sink for KafkaSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn write_batch(&mut self, batch: RecordBatch) -> sluice_engine::Result<()> {
        match &mut self.mode {
            Mode::AtLeastOnce(w) => w.send(&batch, None, &HashSet::new()).await,
            Mode::ExactlyOnce(e) => e.write_batch(batch),
        }
    }

    async fn on_barrier(&mut self, b: Barrier) -> sluice_engine::Result<()> {
        match &mut self.mode {
            Mode::AtLeastOnce(_) => Ok(()),
            Mode::ExactlyOnce(e) => e.on_barrier(b).await,
        }
    }

    async fn close(&mut self) -> sluice_engine::Result<()> {
        match &mut self.mode {
            Mode::AtLeastOnce(w) => w.flush().await,
            Mode::ExactlyOnce(e) => e.close().await,
        }
    }

    async fn abort(&mut self) -> sluice_engine::Result<()> {
        match &mut self.mode {
            Mode::AtLeastOnce(w) => w.flush().await,
            Mode::ExactlyOnce(e) => e.abort().await,
        }
    }
}
