//! `datagen`: generates rows for the declared schema — for demos, tests and benchmarks.
//!
//! ```sql
//! CREATE SOURCE clicks (user_id BIGINT NOT NULL, url TEXT, ts TIMESTAMP NOT NULL,
//!                       WATERMARK FOR ts AS ts - INTERVAL '2 seconds')
//! WITH (connector = 'datagen', rows_per_second = '50000', seed = '7');
//! ```
//!
//! Options:
//! - `rows_per_second` — the rate; `0` means as fast as the pipeline takes them (default 1000).
//! - `max_rows` — stop after this many rows (the source then ends); default: never.
//! - `seed` — the same seed gives the same rows (default 0).
//! - `start_time` — RFC 3339; when set, row *i* has event time `start_time + i × time_step`,
//!   so the whole output is deterministic. Otherwise event time is the wall clock when the
//!   row is generated.
//! - `time_step` — event-time distance between consecutive rows when `start_time` is set
//!   (default `1 / rows_per_second`, or 1 ms when the rate is unlimited); e.g. `'1 minute'`
//!   spreads a fast, bounded run over many hours of event time.
//! - `batch_size` — rows per batch at most (default 8192).
//! - `null_rate` — fraction of NULLs in nullable columns (default 0).
//! - `fields.<column>.min` / `.max` — range of a numeric column (default 0 and 1000);
//!   `fields.<column>.length` — length of generated strings (default 8);
//!   `fields.<column>.cardinality` — distinct strings of a text column (default 10000).
//!
//! Every `TIMESTAMP` column carries the event time; `DATE` columns its day. Rows are produced
//! only while some stream reads the source, so a bounded run (`max_rows`) is never lost.

mod connector;
mod source;

pub use connector::DatagenConnector;
pub use source::DatagenReader;

use std::collections::BTreeMap;

use arrow::datatypes::{DataType, Schema};
use sluice_engine::WithOptions;

use crate::error::{ConnectorError, Result};

/// Per-column generation settings (`fields.<column>.<property>`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSpec {
    /// Smallest value of a numeric column.
    pub min: Option<f64>,
    /// Largest value of a numeric column.
    pub max: Option<f64>,
    /// Length of generated strings.
    pub length: Option<usize>,
    /// Number of distinct strings.
    pub cardinality: Option<usize>,
}

/// Validated options of a `datagen` source.
#[derive(Debug, Clone, PartialEq)]
pub struct DatagenConfig {
    /// Rows per second; 0 = unlimited.
    pub rows_per_second: u64,
    /// Total rows, then the source ends.
    pub max_rows: Option<u64>,
    /// RNG seed.
    pub seed: u64,
    /// Event time of the first row (µs since the epoch), for deterministic event time.
    pub start_time: Option<i64>,
    /// Event-time distance between rows (µs) when `start_time` is set.
    pub time_step: i64,
    /// Largest batch.
    pub batch_size: usize,
    /// Fraction of NULLs in nullable columns.
    pub null_rate: f64,
    /// Per-column settings, by column name.
    pub fields: BTreeMap<String, FieldSpec>,
}

impl DatagenConfig {
    /// Takes the `datagen` options from `opts` and checks them against `schema`.
    pub fn try_new(opts: &mut WithOptions, schema: &Schema) -> Result<Self> {
        let owner = opts.owner().to_string();
        let rows_per_second = opts
            .take_parsed("rows_per_second", "a whole number of rows (0 = unlimited)")?
            .unwrap_or(1000);
        let max_rows = opts.take_parsed("max_rows", "a whole number of rows")?;
        let seed = opts.take_parsed("seed", "a whole number")?.unwrap_or(0);
        let start_time = match opts.take_str("start_time") {
            None => None,
            Some(s) => Some(
                chrono::DateTime::parse_from_rfc3339(s.trim())
                    .map_err(|_| {
                        opts.bad(
                            "start_time",
                            &s,
                            "an RFC 3339 time such as '2024-01-01T00:00:00Z'",
                        )
                    })?
                    .timestamp_micros(),
            ),
        };
        let time_step = match opts.take_duration("time_step")? {
            Some(d) => d.as_micros() as i64,
            None if rows_per_second == 0 => 1000,
            None => (1_000_000 / rows_per_second.max(1)) as i64,
        };
        let batch_size: usize = opts
            .take_parsed("batch_size", "a whole number of rows")?
            .unwrap_or(8192);
        if batch_size == 0 {
            return Err(opts.bad("batch_size", "0", "at least 1").into());
        }
        let null_rate: f64 = opts
            .take_parsed("null_rate", "a fraction between 0 and 1")?
            .unwrap_or(0.0);
        if !(0.0..=1.0).contains(&null_rate) {
            return Err(opts
                .bad(
                    "null_rate",
                    &null_rate.to_string(),
                    "a fraction between 0 and 1",
                )
                .into());
        }
        let mut fields: BTreeMap<String, FieldSpec> = BTreeMap::new();
        for (key, value) in opts.take_prefixed("fields.") {
            let Some((column, prop)) = key.rsplit_once('.') else {
                return Err(ConnectorError::InvalidConfig(format!(
                    "{owner}: option `fields.{key}` must be `fields.<column>.<min|max|length|cardinality>`"
                )));
            };
            if schema.field_with_name(column).is_err() {
                return Err(ConnectorError::InvalidConfig(format!(
                    "{owner}: option `fields.{key}` names column `{column}`, which the source does not have"
                )));
            }
            let spec = fields.entry(column.to_string()).or_default();
            let number = |what: &str| {
                ConnectorError::InvalidConfig(format!(
                    "{owner}: option `fields.{key}` = '{value}' is invalid: expected {what}"
                ))
            };
            match prop {
                "min" => spec.min = Some(value.trim().parse().map_err(|_| number("a number"))?),
                "max" => spec.max = Some(value.trim().parse().map_err(|_| number("a number"))?),
                "length" => {
                    spec.length = Some(value.trim().parse().map_err(|_| number("a length"))?)
                }
                "cardinality" => {
                    let c: usize = value.trim().parse().map_err(|_| number("a count"))?;
                    if c == 0 || c > 10_000_000 {
                        return Err(number("a count between 1 and 10000000"));
                    }
                    spec.cardinality = Some(c)
                }
                _ => {
                    return Err(ConnectorError::InvalidConfig(format!(
                        "{owner}: option `fields.{key}`: `{prop}` is not known; known: min, max, length, cardinality"
                    )));
                }
            }
        }
        for (name, spec) in &fields {
            if let (Some(lo), Some(hi)) = (spec.min, spec.max)
                && lo > hi
            {
                return Err(ConnectorError::InvalidConfig(format!(
                    "{owner}: column `{name}`: min ({lo}) is larger than max ({hi})"
                )));
            }
        }
        for f in schema.fields() {
            if !supported(f.data_type()) {
                return Err(ConnectorError::InvalidConfig(format!(
                    "{owner}: datagen cannot generate column `{}` of type {}",
                    f.name(),
                    f.data_type()
                )));
            }
        }
        Ok(Self {
            rows_per_second,
            max_rows,
            seed,
            start_time,
            time_step,
            batch_size,
            null_rate,
            fields,
        })
    }
}

fn supported(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::Float32
            | DataType::Float64
            | DataType::Boolean
            | DataType::Utf8
            | DataType::Timestamp(_, _)
            | DataType::Date32
    )
}
