//! `kinesis`: a source reading every shard of one Kinesis data stream, and a sink writing to
//! one ([`KinesisSink`]), with aws-sdk-kinesis.
//!
//! ```sql
//! CREATE SOURCE shipments (order_id TEXT NOT NULL, status TEXT, ts TIMESTAMP NOT NULL,
//!                          WATERMARK FOR ts AS ts - INTERVAL '5 seconds')
//! WITH (connector = 'kinesis', stream = 'shipments', start = 'trim_horizon', format = 'json');
//! ```
//!
//! Source options:
//! - `stream` (required) — the data stream's name.
//! - `start` — `trim_horizon` (the default: the oldest record kept) or `latest`.
//! - `format` — `json` (default), `csv` or `avro` (with `schema_registry`), as for Kafka.
//! - `region`, `endpoint` — override `AWS_REGION` / `AWS_ENDPOINT_URL` (credentials come from
//!   the standard AWS chain: environment, profile, instance role).
//! - `raw_zone` — `true` archives every record's data as received under `raw/<source>/`.
//! - `batch_size` — records per `GetRecords` call (default 1000, at most 10000);
//!   `poll_interval` — the pause after a call that returned nothing (default `1 second`;
//!   a shard is never read more than five times a second, the service's limit).
//!
//! The source has one reader for all its streams ([`KinesisReader::shared`]): one task per
//! shard calls `GetRecords`, however many streams read the source; a stream created while it
//! runs catches up with a backfill reader and joins it ([`crate::join`]). A child shard (after a split or a merge) is read only
//! once its parents have been read to their end, so per-key order holds across resharding;
//! new shards are found with `ListShards` every few seconds and as soon as a shard ends.
//! Watermarks are kept per shard like Kafka's per partition (see
//! [`crate::split_clock::SplitClock`]; an ended shard stops counting). Lag per shard is
//! `MillisBehindLatest` from `GetRecords`: `SHOW SOURCES` shows it in milliseconds, by shard
//! number. Sequence numbers (up to 56 digits) are compared numerically.
//!
//! Metadata columns, when declared by name: `_kinesis_partition_key`,
//! `_kinesis_sequence_number`, `_kinesis_shard_id` (text), `_kinesis_arrival_time` (the
//! approximate arrival timestamp; it can be the `WATERMARK` column). Bad records go to
//! `errors/<source>/` with `kinesis stream S shard H sequence N`.

mod connector;
mod sink;
mod source;

pub use connector::KinesisConnector;
pub use sink::{KinesisSink, KinesisSinkConfig};
pub use source::{KinesisReader, Resume};

use std::cmp::Ordering;
use std::time::Duration;

use arrow::datatypes::{DataType, Schema, TimeUnit};
use sluice_engine::WithOptions;

pub use crate::aws::AwsOptions;
use crate::error::{ConnectorError, Result};
use crate::formats::RecordFormat;

/// Where a reader starts in the shards open when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KinesisStart {
    /// The oldest record kept.
    TrimHorizon,
    /// Only records put after the reader starts.
    Latest,
}

/// Validated options of a `kinesis` source.
#[derive(Debug, Clone, PartialEq)]
pub struct KinesisConfig {
    /// The data stream's name.
    pub stream: String,
    /// Where to start.
    pub start: KinesisStart,
    /// How record data is encoded.
    pub format: RecordFormat,
    /// Region and endpoint.
    pub aws: AwsOptions,
    /// Archive raw record data under `raw/<source>/`.
    pub raw_zone: bool,
    /// Records per `GetRecords` call.
    pub batch_size: i32,
    /// The pause after an empty `GetRecords`.
    pub poll_interval: Duration,
}

/// The metadata columns a kinesis source may declare, and the type each is made as.
pub const METADATA_COLUMNS: [(&str, DataType); 4] = [
    ("_kinesis_partition_key", DataType::Utf8),
    ("_kinesis_sequence_number", DataType::Utf8),
    ("_kinesis_shard_id", DataType::Utf8),
    (
        "_kinesis_arrival_time",
        DataType::Timestamp(TimeUnit::Millisecond, None),
    ),
];

impl KinesisConfig {
    /// Takes the `kinesis` options from `opts`, for a source of `schema`.
    pub fn try_new(opts: &mut WithOptions, schema: &Schema) -> Result<Self> {
        for f in schema.fields() {
            if !f.name().starts_with("_kinesis_") {
                continue;
            }
            let Some((_, made_as)) = METADATA_COLUMNS.iter().find(|(n, _)| n == f.name()) else {
                let names: Vec<&str> = METADATA_COLUMNS.iter().map(|(n, _)| *n).collect();
                return Err(ConnectorError::InvalidConfig(format!(
                    "{}: column `{}`: names starting with `_kinesis_` are kinesis metadata: one of {}",
                    opts.owner(),
                    f.name(),
                    names.join(", ")
                )));
            };
            if !arrow::compute::can_cast_types(made_as, f.data_type()) {
                return Err(ConnectorError::InvalidConfig(format!(
                    "{}: column `{}` cannot hold kinesis metadata of type {made_as}",
                    opts.owner(),
                    f.name()
                )));
            }
        }
        let stream = opts.take_required("stream")?;
        let start = match opts.take_str("start") {
            None => KinesisStart::TrimHorizon,
            Some(s) => match s.to_ascii_lowercase().as_str() {
                "trim_horizon" | "earliest" => KinesisStart::TrimHorizon,
                "latest" => KinesisStart::Latest,
                _ => return Err(opts.bad("start", &s, "'trim_horizon' or 'latest'").into()),
            },
        };
        let format = crate::formats::take_format(opts, &["json", "csv", "avro"])?;
        let aws = AwsOptions::take(opts)?;
        let raw_zone = opts.take_bool("raw_zone")?.unwrap_or(false);
        let batch_size: i32 = opts
            .take_parsed("batch_size", "a whole number from 1 to 10000")?
            .unwrap_or(1000);
        if !(1..=10_000).contains(&batch_size) {
            let v = batch_size.to_string();
            return Err(opts
                .bad("batch_size", &v, "a whole number from 1 to 10000")
                .into());
        }
        let poll_interval = opts
            .take_duration("poll_interval")?
            .unwrap_or(Duration::from_secs(1));
        Ok(Self {
            stream,
            start,
            format,
            aws,
            raw_zone,
            batch_size,
            poll_interval,
        })
    }
}

/// Compares Kinesis sequence numbers (decimal strings of up to 56 digits) numerically.
pub fn compare_sequence_numbers(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_compare_as_numbers() {
        let small = "49590338271490256608559692538361571095921575989136588898";
        let bigger = "49590338271490256608559692540925702759324208523137515618";
        assert_eq!(compare_sequence_numbers(small, bigger), Ordering::Less);
        // As strings "9" > "10"; as numbers it is less.
        assert_eq!(compare_sequence_numbers("9", "10"), Ordering::Less);
        assert_eq!(compare_sequence_numbers("007", "7"), Ordering::Equal);
    }
}
