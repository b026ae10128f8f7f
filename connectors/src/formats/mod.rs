//! Record formats, shared by every transport.

pub mod avro;
pub mod csv;
pub mod json;
pub mod registry;

use arrow::datatypes::SchemaRef;

use crate::error::Result;
use json::Decoded;
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
