//! [`KinesisSink`]: rows of a stream or source → records of a Kinesis data stream.
//!
//! ```sql
//! CREATE SINK shipments_out FROM shipments_enriched
//! WITH (connector = 'kinesis', stream = 'shipments-out', partition_key = 'order_id');
//! ```
//!
//! Each row becomes one record: its data the row as a JSON object (or Avro, as for Kafka
//! sinks), its partition key the `partition_key` column as text. Rows are sent with
//! `PutRecords` within the service's limits (500 records and 5 MiB per call; a record of more
//! than 1 MiB fails the sink with its size); the records a call rejects (throttling, internal
//! errors) are retried with backoff until they are accepted. Per-key order is kept: the rows
//! of a batch go out in rounds holding at most one record per key, and a round is complete —
//! every record accepted — before the next is sent.
//!
//! Options: `stream`, `partition_key` (required), `format`, `schema_registry`, `region`,
//! `endpoint`.

use std::collections::HashMap;
use std::time::Duration;

use sluice_engine::retry::RetryPolicy;

use arrow::array::{Array, AsArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Schema};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use bytes::Bytes;
use sluice_engine::{EngineError, WithOptions};

use super::AwsOptions;
use crate::error::{ConnectorError, Result};
use crate::formats::RecordFormat;
use crate::formats::encoder::RowEncoder;

/// Service limits of `PutRecords`.
const MAX_RECORDS_PER_CALL: usize = 500;
const MAX_BYTES_PER_CALL: usize = 5 * 1024 * 1024;
const MAX_RECORD_BYTES: usize = 1024 * 1024;

/// Validated options of a `kinesis` sink.
#[derive(Debug, Clone, PartialEq)]
pub struct KinesisSinkConfig {
    /// The data stream written to.
    pub stream: String,
    /// The column whose value is each record's partition key.
    pub partition_key: String,
    /// How record data is encoded.
    pub format: RecordFormat,
    /// Region and endpoint.
    pub aws: AwsOptions,
}

impl KinesisSinkConfig {
    /// Takes the `kinesis` sink options from `opts`, for rows of `schema`.
    pub fn try_new(opts: &mut WithOptions, schema: &Schema) -> Result<Self> {
        let stream = opts.take_required("stream")?;
        let partition_key = opts.take_required("partition_key")?.to_lowercase();
        if schema.field_with_name(&partition_key).is_err() {
            let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(ConnectorError::InvalidConfig(format!(
                "{}: option `partition_key`: there is no column `{partition_key}` (columns: {})",
                opts.owner(),
                columns.join(", ")
            )));
        }
        let format = crate::formats::take_format(opts, &["json", "avro"])?;
        Ok(Self {
            stream,
            partition_key,
            format,
            aws: AwsOptions::take(opts)?,
        })
    }
}

/// Writes rows to a data stream. See the module docs.
pub struct KinesisSink {
    name: String,
    config: KinesisSinkConfig,
    client: Option<Client>,
    encoder: RowEncoder,
}

impl KinesisSink {
    /// A sink named `name` writing as `config` says.
    pub fn try_new(name: impl Into<String>, config: KinesisSinkConfig) -> Result<Self> {
        let name = name.into();
        let encoder = RowEncoder::new(&name, &config.stream, &config.format)?;
        Ok(Self {
            name,
            config,
            client: None,
            encoder,
        })
    }

    fn failed(&self, what: impl std::fmt::Display) -> EngineError {
        EngineError::external(
            format!(
                "sink `{}` (kinesis stream `{}`)",
                self.name, self.config.stream
            ),
            std::io::Error::other(what.to_string()),
        )
    }

    /// Sends `entries` (one round: at most one per key) until every one is accepted.
    async fn put_round(
        &self,
        client: &Client,
        mut entries: Vec<PutRecordsRequestEntry>,
    ) -> sluice_engine::Result<()> {
        // Failed calls and rejected records alike wait under one policy; it starts over
        // whenever a call gets records accepted, so only five minutes without progress fail
        // the sink.
        let mut retry = RetryPolicy {
            max_attempts: None,
            give_up_after: Some(Duration::from_secs(300)),
            ..RetryPolicy::DEFAULT
        }
        .start();
        while !entries.is_empty() {
            // One call's worth, within the limits.
            let mut take = 0;
            let mut bytes = 0;
            while take < entries.len() && take < MAX_RECORDS_PER_CALL {
                let entry = &entries[take];
                let size = entry.data().as_ref().len() + entry.partition_key().map_or(0, str::len);
                if take > 0 && bytes + size > MAX_BYTES_PER_CALL {
                    break;
                }
                bytes += size;
                take += 1;
            }
            let call: Vec<PutRecordsRequestEntry> = entries.drain(..take).collect();
            let answer = client
                .put_records()
                .stream_name(&self.config.stream)
                .set_records(Some(call.clone()))
                .send()
                .await;
            let sent = call.len();
            let again: Vec<PutRecordsRequestEntry> = match answer {
                Ok(out) if out.failed_record_count().unwrap_or(0) == 0 => vec![],
                Ok(out) => {
                    let first = out
                        .records()
                        .iter()
                        .find_map(|r| r.error_code().map(str::to_string))
                        .unwrap_or_default();
                    tracing::warn!(
                        sink = %self.name,
                        failed = out.failed_record_count().unwrap_or(0),
                        "kinesis PutRecords: some records were rejected ({first}); retrying them"
                    );
                    call.into_iter()
                        .zip(out.records())
                        .filter(|(_, r)| r.error_code().is_some())
                        .map(|(e, _)| e)
                        .collect()
                }
                Err(e) => {
                    let text = aws_sdk_kinesis::error::DisplayErrorContext(&e).to_string();
                    tracing::warn!(sink = %self.name, "kinesis PutRecords: {text}; retrying");
                    if retry.failures() >= RetryPolicy::DEFAULT.max_attempts.unwrap_or(20) {
                        return Err(self.failed(text));
                    }
                    call
                }
            };
            if again.len() < sent {
                retry.reset(); // progress
            }
            if !again.is_empty() {
                let Some(delay) = retry.next_delay() else {
                    return Err(self.failed(format!(
                        "{} records still rejected after five minutes of retries",
                        again.len()
                    )));
                };
                // Retried first, so the round stays in order.
                entries.splice(0..0, again);
                tokio::time::sleep(delay).await;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl sluice_engine::Sink for KinesisSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn write_batch(&mut self, batch: RecordBatch) -> sluice_engine::Result<()> {
        if self.client.is_none() {
            self.client = Some(self.config.aws.client().await);
        }
        let values: Vec<Bytes> = self.encoder.encode(&batch).await?;
        let keys = batch
            .column_by_name(&self.config.partition_key)
            .ok_or_else(|| self.failed(format!("no column `{}`", self.config.partition_key)))?;
        let keys = cast(keys, &DataType::Utf8)?;
        let keys = keys.as_string::<i32>();
        // Round r holds the r-th row of each key.
        let mut rounds: Vec<Vec<PutRecordsRequestEntry>> = Vec::new();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (row, value) in values.into_iter().enumerate() {
            if value.len() > MAX_RECORD_BYTES {
                return Err(self.failed(format!(
                    "a row encodes to {} bytes; Kinesis takes at most 1 MiB per record",
                    value.len()
                )));
            }
            // Kinesis needs a key: NULL becomes the empty string's stand-in.
            let key = if keys.is_valid(row) && !keys.value(row).is_empty() {
                keys.value(row)
            } else {
                "null"
            };
            let round = seen.entry(key).or_insert(0);
            if *round == rounds.len() {
                rounds.push(Vec::new());
            }
            rounds[*round].push(
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(value.to_vec()))
                    .partition_key(key)
                    .build()
                    .map_err(|e| self.failed(e))?,
            );
            *round += 1;
        }
        let client = self.client.clone().expect("made above");
        for round in rounds {
            self.put_round(&client, round).await?;
        }
        Ok(())
    }

    async fn close(&mut self) -> sluice_engine::Result<()> {
        Ok(())
    }
}
