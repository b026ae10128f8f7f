//! `kafka`: a source reading one topic of a Kafka-protocol broker (rdkafka, bundled
//! librdkafka), and a sink writing to one ([`KafkaSink`]).
//!
//! ```sql
//! CREATE SOURCE orders (order_id TEXT NOT NULL, amount DOUBLE, ts TIMESTAMP NOT NULL,
//!                       WATERMARK FOR ts AS ts - INTERVAL '5 seconds')
//! WITH (connector = 'kafka', brokers = '127.0.0.1:9092', topic = 'orders',
//!       format = 'json', start = 'earliest', raw_zone = 'true');
//! ```
//!
//! Options:
//! - `brokers` (required) — bootstrap servers, `host:port[,host:port…]`.
//! - `topic` (required) — the topic; every partition is read.
//! - `format` — `json` (the default; one JSON object per record value), `csv` (one CSV row
//!   per record value, fields in column order, no header) or `avro` (Confluent wire format;
//!   see [`crate::formats::avro`] for schema resolution).
//! - `schema_registry` — with `avro`: the URL of a Confluent-compatible schema registry.
//! - `start` — `earliest` (the default), `latest`, or `committed` (where the source's
//!   consumer group `sluice-<source>` committed: Sluice commits the offsets the source has
//!   read once a checkpoint made them durable): where the source's reader starts, and with
//!   `earliest` where a stream created while the source runs starts too (see below).
//! - `raw_zone` — `true` archives every record value as received under `raw/<source>/…`
//!   before it is decoded (default `false`).
//! - `batch_size` — records per batch at most (default 8192); a batch is also cut after
//!   `linger` (default `50 ms`) so a quiet topic still flows.
//! - `properties.<name>` — passed to librdkafka as is (e.g. `properties.security.protocol`).
//! - `fetcher` — which client fetches the records: `builtin` (the source's own Fetch API
//!   client, see `fetcher/`: a record costs a few varints and one copy), `librdkafka`, or
//!   `auto` (the default: `builtin` unless the properties ask for TLS or SASL, which only
//!   librdkafka speaks). librdkafka does the rest either way: metadata, start offsets,
//!   the consumer group's commits, the sink.
//!
//! Record metadata becomes columns when the source declares them by these names (any type
//! the value casts to): `_kafka_key` (text; NULL without a key), `_kafka_partition`,
//! `_kafka_offset`, `_kafka_timestamp` (the record's timestamp; it can be the `WATERMARK`
//! column), `_kafka_headers` (text: the record's headers as a JSON object, name → value as
//! UTF-8 text or `null`; `{}` without headers; a repeated name keeps its last value). The other
//! columns are decoded from the record's value.
//!
//! A record that fails to decode or to fit the declared schema goes to `errors/<source>/…`
//! with its value, the reason and its topic/partition/offset, and is counted; the others go
//! on. Watermarks are kept per partition (largest event time seen in that partition minus
//! the declared delay); the source's watermark is the smallest over the partitions, so a
//! partition that lags — or has delivered nothing yet — holds event time back, and one that
//! has been quiet for the source's `idle_timeout` stops doing so until it delivers again
//! (when every partition is quiet, the watermark is the largest of theirs).
//! (Without `idle_timeout`, an empty partition holds windows open: set it for topics whose
//! partitions may be empty.)
//!
//! The source has one reader, assigned every partition (no consumer group coordination): it
//! decodes each record once, archives the raw values, reports the bad records and publishes
//! the rows to every stream reading the source. A stream created while the source runs
//! (with `start = 'earliest'`) first reads the topic with a backfill reader of its own until
//! it is level with the source's reader, then joins it (see `join.rs`); with `latest` or
//! `committed` it starts where the source's reader is.

mod connector;
mod exactly_once;
mod fetch_queue;
mod fetcher;
pub(crate) mod offsets;
mod sink;
mod source;

pub use connector::KafkaConnector;
pub use exactly_once::{DELIVERY_HEADER, SinkCheckpoint};

pub use sink::{Delivery, KafkaSink, KafkaSinkConfig};
pub use source::KafkaReader;

use std::time::Duration;

use arrow::datatypes::{DataType, Schema, TimeUnit};
use sluice_engine::WithOptions;

use crate::error::{ConnectorError, Result};
use crate::formats::RecordFormat;

/// Where a reader starts in each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// The oldest record still in the partition.
    Earliest,
    /// Only records produced after the reader starts.
    Latest,
    /// Where the source's consumer group (`sluice-<source>`) committed: Sluice commits the
    /// offsets of what the source archived once a checkpoint made it durable. Partitions
    /// without a committed offset start at the earliest record.
    Committed,
}

/// Validated options of a `kafka` source.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// The topic.
    pub topic: String,
    /// How record values are encoded.
    pub format: RecordFormat,
    /// Where to start.
    pub start: StartPosition,
    /// Archive raw record values under `raw/<source>/`.
    pub raw_zone: bool,
    /// Records per batch at most.
    pub batch_size: usize,
    /// How long a batch waits for more records.
    pub linger: Duration,
    /// Extra librdkafka properties.
    pub properties: Vec<(String, String)>,
    /// Which client fetches the records.
    pub fetcher: FetchClient,
}

/// Which client fetches a source's records (the `fetcher` option).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchClient {
    /// The source's own fetch client where it speaks what the cluster needs (plaintext),
    /// librdkafka otherwise.
    Auto,
    /// The source's own fetch client; only for plaintext connections.
    Builtin,
    /// librdkafka's consumer.
    Librdkafka,
}

/// The metadata columns a kafka source may declare, and the type each is made as.
pub const METADATA_COLUMNS: [(&str, DataType); 5] = [
    ("_kafka_key", DataType::Utf8),
    ("_kafka_partition", DataType::Int32),
    ("_kafka_offset", DataType::Int64),
    (
        "_kafka_timestamp",
        DataType::Timestamp(TimeUnit::Millisecond, None),
    ),
    // A JSON object: header name → value as text (NULL without one).
    ("_kafka_headers", DataType::Utf8),
];

/// Checks the metadata columns `schema` declares (see the module docs).
fn check_metadata_columns(owner: &str, schema: &Schema) -> Result<()> {
    for f in schema.fields() {
        if !f.name().starts_with("_kafka_") {
            continue;
        }
        let Some((_, made_as)) = METADATA_COLUMNS.iter().find(|(n, _)| n == f.name()) else {
            let names: Vec<&str> = METADATA_COLUMNS.iter().map(|(n, _)| *n).collect();
            return Err(ConnectorError::InvalidConfig(format!(
                "{owner}: column `{}`: names starting with `_kafka_` are kafka metadata: one of {}",
                f.name(),
                names.join(", ")
            )));
        };
        if !arrow::compute::can_cast_types(made_as, f.data_type()) {
            return Err(ConnectorError::InvalidConfig(format!(
                "{owner}: column `{}` cannot hold kafka metadata of type {made_as}",
                f.name()
            )));
        }
        if f.name() == "_kafka_key" && !f.is_nullable() {
            return Err(ConnectorError::InvalidConfig(format!(
                "{owner}: column `_kafka_key` cannot be NOT NULL: records may have no key"
            )));
        }
    }
    Ok(())
}

impl KafkaConfig {
    /// Takes the `kafka` options from `opts`, for a source of `schema`.
    pub fn try_new(opts: &mut WithOptions, schema: &Schema) -> Result<Self> {
        check_metadata_columns(opts.owner(), schema)?;
        let brokers = opts.take_required("brokers")?;
        let topic = opts.take_required("topic")?;
        let format = crate::formats::take_format(opts, &["json", "csv", "avro"])?;
        let start = match opts.take_str("start") {
            None => StartPosition::Earliest,
            Some(s) => match s.to_ascii_lowercase().as_str() {
                "earliest" => StartPosition::Earliest,
                "latest" => StartPosition::Latest,
                "committed" => StartPosition::Committed,
                _ => {
                    return Err(opts
                        .bad("start", &s, "'earliest', 'latest' or 'committed'")
                        .into());
                }
            },
        };
        let raw_zone = opts.take_bool("raw_zone")?.unwrap_or(false);
        let batch_size: usize = opts
            .take_parsed("batch_size", "a positive integer")?
            .unwrap_or(8192);
        if batch_size == 0 {
            return Err(opts.bad("batch_size", "0", "a positive integer").into());
        }
        let linger = opts
            .take_duration("linger")?
            .unwrap_or(Duration::from_millis(50));
        let properties = opts.take_prefixed("properties.");
        let fetcher = match opts.take_str("fetcher") {
            None => FetchClient::Auto,
            Some(s) => match s.to_ascii_lowercase().as_str() {
                "auto" => FetchClient::Auto,
                "builtin" => FetchClient::Builtin,
                "librdkafka" => FetchClient::Librdkafka,
                _ => {
                    return Err(opts
                        .bad("fetcher", &s, "'auto', 'builtin' or 'librdkafka'")
                        .into());
                }
            },
        };
        if fetcher == FetchClient::Builtin && !fetcher::speaks(&properties) {
            return Err(ConnectorError::InvalidConfig(format!(
                "{}: fetcher = 'builtin' speaks plaintext only, but the source's properties ask \
                 for TLS or SASL: leave `fetcher` out or set it to 'librdkafka'",
                opts.owner()
            )));
        }
        Ok(Self {
            brokers,
            topic,
            format,
            start,
            raw_zone,
            batch_size,
            linger,
            properties,
            fetcher,
        })
    }
}
