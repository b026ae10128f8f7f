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
//! `acks=all`; librdkafka retries with backoff. A batch counts as written only when every
//! record of it is acknowledged, so what is acknowledged upstream of the sink is on the
//! topic (at least once; exactly once comes with checkpoints).
//!
//! `header.<name> = '<column>'` adds a header `<name>` to each record carrying the column's
//! value (bytes for `BYTEA`, text otherwise; no header when NULL).
//!
//! Options: `brokers`, `topic` (required), `key`, `format` (`json` or `avro`),
//! `schema_registry` (with `avro`), `header.<name>`, `properties.<name>`.

use std::time::Duration;

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Schema};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sluice_engine::{EngineError, WithOptions};

use crate::error::{ConnectorError, Result};
use crate::formats::RecordFormat;
use crate::formats::encoder::RowEncoder;

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
        Ok(Self {
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
    config: KafkaSinkConfig,
    producer: FutureProducer,
    /// Rows → record values.
    encoder: RowEncoder,
}

impl KafkaSink {
    /// A sink named `name` (for logs and errors) writing as `config` says.
    pub fn try_new(name: impl Into<String>, config: KafkaSinkConfig) -> Result<Self> {
        let name = name.into();
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &config.brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            // The Java client's default partitioner for keyed records.
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "120000");
        for (k, v) in &config.properties {
            cfg.set(k, v);
        }
        let producer = cfg.create().map_err(|e| {
            ConnectorError::InvalidConfig(format!("sink `{name}`: kafka producer: {e}"))
        })?;
        let encoder = RowEncoder::new(&name, &config.topic, &config.format)?;
        Ok(Self {
            name,
            config,
            producer,
            encoder,
        })
    }

    fn failed(&self, what: impl std::fmt::Display) -> EngineError {
        EngineError::external(
            format!("sink `{}` (kafka topic `{}`)", self.name, self.config.topic),
            std::io::Error::other(what.to_string()),
        )
    }
}

#[async_trait]
impl sluice_engine::Sink for KafkaSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn write_batch(&mut self, batch: RecordBatch) -> sluice_engine::Result<()> {
        let values = self.encoder.encode(&batch).await?;
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
        for (i, value) in values.iter().enumerate() {
            let mut record =
                FutureRecord::<str, [u8]>::to(&self.config.topic).payload(value.as_ref());
            if let Some(keys) = &keys
                && keys.is_valid(i)
            {
                record = record.key(keys.value(i));
            }
            if !headers.is_empty() {
                let mut owned = OwnedHeaders::new_with_capacity(headers.len());
                for (name, values) in &headers {
                    let values = values.as_binary::<i32>();
                    if values.is_valid(i) {
                        owned = owned.insert(Header {
                            key: name,
                            value: Some(values.value(i)),
                        });
                    }
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

    async fn close(&mut self) -> sluice_engine::Result<()> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(30)))
            .await
            .map_err(|e| EngineError::Internal(format!("kafka flush task: {e}")))?
            .map_err(|e| self.failed(e))
    }
}
