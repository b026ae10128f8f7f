//! Record formats, shared by every transport.

pub mod csv;
pub mod json;

use arrow::datatypes::SchemaRef;

use crate::error::Result;
use json::Decoded;

/// The format of a source's records (`WITH (format = …)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordFormat {
    /// One JSON object per record.
    Json,
    /// One CSV row per record, fields in column order, no header.
    Csv,
}

/// Decodes records of one [`RecordFormat`] into batches of one schema.
#[derive(Debug, Clone)]
pub enum Decoder {
    /// JSON.
    Json(json::JsonDecoder),
    /// CSV.
    Csv(csv::CsvDecoder),
}

impl Decoder {
    /// A decoder of `format` producing `schema`.
    pub fn new(format: RecordFormat, schema: SchemaRef) -> Self {
        match format {
            RecordFormat::Json => Decoder::Json(json::JsonDecoder::new(schema)),
            RecordFormat::Csv => Decoder::Csv(csv::CsvDecoder::new(schema)),
        }
    }

    /// Decodes `records`: the good ones into one batch, the bad ones with their reasons.
    pub fn decode(&self, records: &[&[u8]]) -> Result<Decoded> {
        match self {
            Decoder::Json(d) => d.decode(records),
            Decoder::Csv(d) => d.decode(records),
        }
    }
}
