//! Record formats, shared by every transport.

pub mod avro;
pub mod csv;
pub mod encoder;
pub mod json;
pub mod registry;

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, new_null_array};
use arrow::compute::cast;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use sluice_engine::WithOptions;

use crate::error::{ConnectorError, Result};
pub use json::{Decoded, RecordError};
use registry::SchemaRegistry;

/// The format of a source's records (`WITH (format = …)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordFormat {
    /// One JSON object per record.
    Json,
    /// One CSV row per record, fields in column order, no header.
    Csv,
    /// One Avro record per record value, in the Confluent wire format; writer schemas from
    /// the schema registry at this URL.
    Avro {
        /// The schema registry's base URL.
        registry: String,
    },
}

impl RecordFormat {
    /// Whether records of this format are binary (kept as base64 in the errors zone).
    pub fn is_binary(&self) -> bool {
        matches!(self, RecordFormat::Avro { .. })
    }
}

/// Decodes records of one [`RecordFormat`] into batches of one schema.
#[derive(Debug)]
pub enum Decoder {
    /// JSON.
    Json(json::JsonDecoder),
    /// CSV.
    Csv(csv::CsvDecoder),
    /// Avro (Confluent wire format).
    Avro(Box<avro::AvroDecoder>),
}

impl Decoder {
    /// A decoder of `format` producing `schema`.
    pub fn new(format: &RecordFormat, schema: SchemaRef) -> Result<Self> {
        Ok(match format {
            RecordFormat::Json => Decoder::Json(json::JsonDecoder::new(schema)),
            RecordFormat::Csv => Decoder::Csv(csv::CsvDecoder::new(schema)),
            RecordFormat::Avro { registry } => Decoder::Avro(Box::new(avro::AvroDecoder::new(
                schema,
                SchemaRegistry::new(registry)?,
            ))),
        })
    }

    /// Decodes `records`: the good ones into one batch, the bad ones with their reasons.
    pub async fn decode(&mut self, records: &[&[u8]]) -> Result<Decoded> {
        match self {
            Decoder::Json(d) => d.decode(records),
            Decoder::Csv(d) => d.decode(records),
            Decoder::Avro(d) => d.decode(records).await,
        }
    }
}

/// Takes `format` (one of `allowed`, default `json`) and, for `avro`, `schema_registry`.
pub fn take_format(opts: &mut WithOptions, allowed: &[&str]) -> Result<RecordFormat> {
    let registry = opts.take_str("schema_registry");
    let expected = allowed
        .iter()
        .map(|f| format!("'{f}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let format = match opts.take_str("format") {
        None => RecordFormat::Json,
        Some(format) => match format.to_ascii_lowercase().as_str() {
            f if !allowed.contains(&f) => {
                return Err(opts
                    .bad("format", &format, &format!("one of {expected}"))
                    .into());
            }
            "json" => RecordFormat::Json,
            "csv" => RecordFormat::Csv,
            "avro" => {
                let Some(registry) = registry.clone() else {
                    return Err(ConnectorError::InvalidConfig(format!(
                        "{}: format 'avro' needs `schema_registry` (the URL of a Confluent-compatible schema registry, e.g. 'http://127.0.0.1:8081')",
                        opts.owner()
                    )));
                };
                // Checked now, so a bad URL is a DDL error rather than a runtime one.
                crate::formats::registry::SchemaRegistry::new(&registry)
                    .map_err(|e| ConnectorError::InvalidConfig(format!("{}: {e}", opts.owner())))?;
                RecordFormat::Avro { registry }
            }
            _ => {
                return Err(opts
                    .bad("format", &format, &format!("one of {expected}"))
                    .into());
            }
        },
    };
    if registry.is_some() && !matches!(format, RecordFormat::Avro { .. }) {
        return Err(ConnectorError::InvalidConfig(format!(
            "{}: `schema_registry` is only used with format = 'avro'",
            opts.owner()
        )));
    }
    Ok(format)
}

/// `batch` (columns by name) in `schema`: declared columns cast to their types, missing
/// nullable ones NULL; the rows that do not fit (a missing or NULL `NOT NULL` value, a value
/// that does not convert), with why, are left out.
pub fn fit(
    schema: &SchemaRef,
    batch: RecordBatch,
) -> sluice_engine::Result<(RecordBatch, Vec<(usize, String)>)> {
    let rows = batch.num_rows();
    let mut reasons: Vec<Option<String>> = vec![None; rows];
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        let column = match batch.column_by_name(f.name()) {
            None => new_null_array(f.data_type(), rows),
            Some(from) => {
                let to = cast(from, f.data_type())?;
                for (row, reason) in reasons.iter_mut().enumerate() {
                    if reason.is_none() && from.is_valid(row) && to.is_null(row) {
                        *reason = Some(format!(
                            "column `{}`: the value does not fit {}",
                            f.name(),
                            f.data_type()
                        ));
                    }
                }
                to
            }
        };
        if !f.is_nullable() {
            for (row, reason) in reasons.iter_mut().enumerate() {
                if reason.is_none() && column.is_null(row) {
                    *reason = Some(format!("column `{}` is NOT NULL", f.name()));
                }
            }
        }
        columns.push(column);
    }
    let keep: arrow::array::BooleanArray = reasons.iter().map(|r| Some(r.is_none())).collect();
    let unfit: Vec<(usize, String)> = reasons
        .into_iter()
        .enumerate()
        .filter_map(|(row, r)| r.map(|r| (row, r)))
        .collect();
    // Filtered before the batch is made: a `NOT NULL` column may hold NULLs in rows left out.
    let columns = if unfit.is_empty() {
        columns
    } else {
        columns
            .iter()
            .map(|c| arrow::compute::filter(c, &keep))
            .collect::<Result<_, _>>()?
    };
    let options =
        arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(rows - unfit.len()));
    let fitted = RecordBatch::try_new_with_options(Arc::clone(schema), columns, &options)?;
    Ok((fitted, unfit))
}

/// A record value as the errors zone keeps it: text as is; binary, or text that is not
/// valid UTF-8, as base64, so that the bytes are kept exactly. The flag says which.
pub fn payload_text(value: &[u8], binary: bool) -> (String, bool) {
    use base64::Engine as _;
    match std::str::from_utf8(value) {
        Ok(text) if !binary => (text.to_string(), false),
        _ => (
            base64::engine::general_purpose::STANDARD.encode(value),
            true,
        ),
    }
}

/// A rejected record for the errors zone, its payload kept as [`payload_text`] says.
pub fn bad_record(
    payload: &[u8],
    binary: bool,
    reason: String,
    origin: String,
) -> sluice_engine::BadRecord {
    let (payload, payload_base64) = payload_text(payload, binary);
    sluice_engine::BadRecord {
        payload,
        payload_base64,
        reason,
        origin,
    }
}

/// A source's rows in its declared `schema`: each metadata column (one `metadata` makes, by
/// name) cast to its declared type, every other column taken from the `decoded` values.
pub fn with_metadata_columns(
    schema: &arrow::datatypes::SchemaRef,
    decoded: arrow::record_batch::RecordBatch,
    mut metadata: impl FnMut(&str) -> Option<arrow::array::ArrayRef>,
) -> sluice_engine::Result<arrow::record_batch::RecordBatch> {
    let mut columns = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        let column = match metadata(f.name()) {
            Some(made) => arrow::compute::cast(&made, f.data_type())?,
            None => std::sync::Arc::clone(decoded.column_by_name(f.name()).ok_or_else(|| {
                sluice_engine::EngineError::Internal(format!("no decoded column `{}`", f.name()))
            })?),
        };
        columns.push(column);
    }
    Ok(arrow::record_batch::RecordBatch::try_new(
        std::sync::Arc::clone(schema),
        columns,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_that_are_not_utf8_are_kept_byte_exact_as_base64() {
        assert_eq!(
            payload_text(br#"{"a":1}"#, false),
            (r#"{"a":1}"#.to_string(), false)
        );
        let invalid = b"{\"a\":\"\xff\xfe\"}";
        let (text, base64) = payload_text(invalid, false);
        assert!(base64);
        use base64::Engine as _;
        let back = base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap();
        assert_eq!(back, invalid);
        // Binary formats are always base64.
        assert!(payload_text(b"abc", true).1);
    }
}
