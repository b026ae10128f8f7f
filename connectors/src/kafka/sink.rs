//! [`KafkaSink`]: rows of a stream or source → JSON records on a topic.
//!
//! ```sql
//! CREATE SINK revenue_out FROM revenue_10s
//! WITH (connector = 'kafka', brokers = '127.0.0.1:9092', topic = 'revenue',
//!       key = 'customer_id', format = 'json');
//! ```
//!
//! Each row becomes one record: its value the row as a JSON object (arrow-json; timestamps
//! RFC 3339), its key the `key` column as text (no key when the option is absent or the value
//! is NULL). Partitions are chosen by librdkafka's `murmur2_random` partitioner — the Java
//! client's default: `murmur2(key) % partitions` for keyed records, so keys land where other
//! producers put them and a key's records stay in order. The producer is idempotent with
//! `acks=all`; librdkafka retries with backoff. A batch counts as written only when every
//! record of it is acknowledged, so what is acknowledged upstream of the sink is on the
//! topic (at least once; exactly once comes with checkpoints).
//!
//! Options: `brokers`, `topic` (required), `key`, `format` (`json`), `properties.<name>`.

use std::time::Duration;

use arrow::array::{Array, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Schema};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sluice_engine::{EngineError, WithOptions};

use crate::error::{ConnectorError, Result};

/// Validated options of a `kafka` sink.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaSinkConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// The topic written to.
    pub topic: String,
    /// The column whose value keys each record.
    pub key: Option<String>,
    /// Extra librdkafka properties.
    pub properties: Vec<(String, String)>,
}

impl KafkaSinkConfig {
    /// Takes the `kafka` sink options from `opts`, for rows of `schema`.
    pub fn try_new(opts: &mut WithOptions, schema: &Schema) -> Result<Self> {
        let brokers = opts.take_required("brokers")?;
        let topic = opts.take_required("topic")?;
        if let Some(format) = opts.take_str("format") {
            match format.to_ascii_lowercase().as_str() {
                "json" => {}
                "avro" => {
                    return Err(ConnectorError::InvalidConfig(format!(
                        "{}: format `avro` is not available for kafka in this build yet (available: json)",
                        opts.owner()
                    )));
                }
                _ => return Err(opts.bad("format", &format, "'json'").into()),
            }
        }
        let key = opts.take_str("key").map(|k| k.to_lowercase());
        if let Some(k) = &key
            && schema.field_with_name(k).is_err()
        {
            let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(ConnectorError::InvalidConfig(format!(
                "{}: option `key`: there is no column `{k}` (columns: {})",
                opts.owner(),
                columns.join(", ")
            )));
        }
        Ok(Self {
            brokers,
            topic,
            key,
            properties: opts.take_prefixed("properties."),
        })
    }
}

/// Writes rows to a topic. See the module docs.
pub struct KafkaSink {
    name: String,
    config: KafkaSinkConfig,
    producer: FutureProducer,
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
        Ok(Self {
            name,
            config,
            producer,
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
        let mut json = Vec::new();
        {
            let mut writer = arrow::json::LineDelimitedWriter::new(&mut json);
            writer.write(&batch)?;
            writer.finish()?;
        }
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
        let mut deliveries = Vec::with_capacity(batch.num_rows());
        for (i, value) in json
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .enumerate()
        {
            let mut record = FutureRecord::<str, [u8]>::to(&self.config.topic).payload(value);
            if let Some(keys) = &keys
                && keys.is_valid(i)
            {
                record = record.key(keys.value(i));
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
