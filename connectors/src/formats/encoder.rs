//! [`RowEncoder`]: rows → one record value each, as JSON or as Avro in the Confluent wire
//! format, for the sinks of every transport.
//!
//! JSON: the row as one object (arrow-json; timestamps RFC 3339). Avro: the rows' schema — a
//! record named after the sink, namespace `sluice`, nullable columns as `["null", T]` unions
//! — is registered under the subject `<destination>-value` before the first row is encoded,
//! and its id framed into every value (arrow-avro's encoder).

use arrow::datatypes::Schema;
use arrow::record_batch::RecordBatch;
use arrow_avro::schema::{
    AVRO_NAME_METADATA_KEY, AVRO_NAMESPACE_METADATA_KEY, AvroSchema, FingerprintStrategy,
};
use arrow_avro::writer::format::AvroSoeFormat;
use arrow_avro::writer::{Encoder as AvroEncoder, WriterBuilder};
use bytes::Bytes;
use sluice_engine::EngineError;

use super::RecordFormat;
use super::registry::SchemaRegistry;
use crate::error::{ConnectorError, Result};

/// Encodes rows as record values. See the module docs.
pub struct RowEncoder {
    /// The sink's name (the Avro record's name).
    sink: String,
    /// The topic or stream written to (the registry subject's prefix).
    destination: String,
    /// With Avro: the registry, and the encoder once the schema is registered.
    avro: Option<(SchemaRegistry, Option<AvroEncoder>)>,
}

impl RowEncoder {
    /// An encoder for sink `sink` writing `format` to `destination`.
    pub fn new(sink: &str, destination: &str, format: &RecordFormat) -> Result<Self> {
        let avro = match format {
            RecordFormat::Json => None,
            RecordFormat::Avro { registry } => Some((SchemaRegistry::new(registry)?, None)),
            RecordFormat::Csv => {
                return Err(ConnectorError::InvalidConfig(format!(
                    "sink `{sink}`: format 'csv' is not available for sinks (use 'json' or 'avro')"
                )));
            }
        };
        Ok(Self {
            sink: sink.to_string(),
            destination: destination.to_string(),
            avro,
        })
    }

    fn failed(&self, what: impl std::fmt::Display) -> EngineError {
        EngineError::external(
            format!("sink `{}` (`{}`)", self.sink, self.destination),
            std::io::Error::other(what.to_string()),
        )
    }

    /// The values of `batch`'s rows, in order.
    pub async fn encode(&mut self, batch: &RecordBatch) -> sluice_engine::Result<Vec<Bytes>> {
        let Some((registry, encoder)) = &self.avro else {
            let mut json = Vec::new();
            let mut writer = arrow::json::LineDelimitedWriter::new(&mut json);
            writer.write(batch)?;
            writer.finish()?;
            let json = Bytes::from(json);
            let mut values = Vec::with_capacity(batch.num_rows());
            let mut start = 0;
            for (i, b) in json.iter().enumerate() {
                if *b == b'\n' {
                    values.push(json.slice(start..i));
                    start = i + 1;
                }
            }
            return Ok(values);
        };
        if encoder.is_none() {
            let metadata = [
                (AVRO_NAME_METADATA_KEY.to_string(), self.sink.clone()),
                (AVRO_NAMESPACE_METADATA_KEY.to_string(), "sluice".into()),
            ];
            let schema = Schema::new_with_metadata(
                batch.schema().fields().clone(),
                metadata.into_iter().collect(),
            );
            let avro = AvroSchema::try_from(&schema)?;
            let subject = format!("{}-value", self.destination);
            let id = registry
                .register(&subject, &avro.json_string)
                .await
                .map_err(|e| self.failed(e))?;
            tracing::info!(sink = %self.sink, subject, id, "avro: schema registered");
            let built = WriterBuilder::new(schema)
                .with_fingerprint_strategy(FingerprintStrategy::Id(id))
                .build_encoder::<AvroSoeFormat>()
                .map_err(|e| self.failed(e))?;
            if let Some((_, slot)) = &mut self.avro {
                *slot = Some(built);
            }
        }
        let Some((_, Some(encoder))) = &mut self.avro else {
            unreachable!("built above")
        };
        match encoder.encode(batch) {
            Ok(()) => Ok(encoder.flush().iter().collect()),
            Err(e) => Err(self.failed(e)),
        }
    }
}
