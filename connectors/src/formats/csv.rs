//! CSV records decoded into Arrow batches with arrow-csv.
//!
//! Each record is one CSV row, its fields in the order of the declared columns (no header).
//! As for JSON, the whole input is decoded in one pass; only when that fails is each record
//! decoded on its own, to tell the good from the bad and say why each bad one failed.
//!
//! Decoding rules (arrow-csv's): an empty field is NULL, which a `NOT NULL` column rejects;
//! timestamps are RFC 3339 (`2024-05-01T12:00:00Z`) or `2024-05-01 12:00:00`; a row with
//! more or fewer fields than columns is an error.

use std::io::Cursor;
use std::sync::Arc;

use arrow::compute::concat_batches;
use arrow::csv::ReaderBuilder;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use super::json::{Decoded, RecordError};
use crate::error::Result;

/// Decodes CSV rows into batches of one schema.
#[derive(Debug, Clone)]
pub struct CsvDecoder {
    schema: SchemaRef,
}

impl CsvDecoder {
    /// A decoder producing `schema`.
    pub fn new(schema: SchemaRef) -> Self {
        Self { schema }
    }

    /// Decodes `records` (each one CSV row, without a trailing newline).
    pub fn decode(&self, records: &[&[u8]]) -> Result<Decoded> {
        match self.decode_all(records) {
            Ok(batch) => Ok(Decoded {
                batch,
                errors: vec![],
            }),
            Err(_) => {
                let mut good = Vec::with_capacity(records.len());
                let mut errors = Vec::new();
                for (index, r) in records.iter().enumerate() {
                    match self.decode_all(std::slice::from_ref(r)) {
                        Ok(b) => good.push(b),
                        Err(reason) => errors.push(RecordError { index, reason }),
                    }
                }
                let batch = concat_batches(&self.schema, &good)?;
                Ok(Decoded { batch, errors })
            }
        }
    }

    fn decode_all(&self, records: &[&[u8]]) -> Result<RecordBatch, String> {
        let mut body = Vec::with_capacity(records.iter().map(|r| r.len() + 1).sum());
        for r in records {
            body.extend_from_slice(r);
            body.push(b'\n');
        }
        let reader = ReaderBuilder::new(Arc::clone(&self.schema))
            .with_header(false)
            .with_batch_size(records.len().max(1))
            .build_buffered(Cursor::new(body))
            .map_err(|e| explain(&e.to_string()))?;
        let batches = reader
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| explain(&e.to_string()))?;
        let batch = concat_batches(&self.schema, &batches).map_err(|e| e.to_string())?;
        // A quoted field holding a newline would make two rows of one record (or one of
        // two): the row count catches that.
        if batch.num_rows() != records.len() {
            return Err(format!(
                "{} CSV rows in {} records",
                batch.num_rows(),
                records.len()
            ));
        }
        Ok(batch)
    }
}

/// Rewords arrow-csv's messages where they would puzzle a user.
fn explain(message: &str) -> String {
    let m = message
        .strip_prefix("Csv error: ")
        .or_else(|| message.strip_prefix("Parser error: "))
        .unwrap_or(message);
    m.to_string()
}

#[cfg(test)]
mod tests {
    use arrow::array::{Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

    use super::*;

    fn decoder() -> CsvDecoder {
        CsvDecoder::new(Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
        ])))
    }

    #[test]
    fn good_rows_decode_and_bad_ones_are_named() {
        let records: Vec<&[u8]> = vec![
            b"1,alice,2024-05-01T12:00:00Z",
            b"two,bob,2024-05-01T12:00:01Z",
            b"3,,2024-05-01T12:00:02Z",
            b"4,dave",
            b"5,\"eve, the second\",2024-05-01T12:00:04Z",
        ];
        let d = decoder().decode(&records).unwrap();
        let ids = d
            .batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert_eq!(ids.values(), &[1, 3, 5]);
        let names = d
            .batch
            .column(1)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert!(names.is_null(1), "an empty field is NULL");
        assert_eq!(names.value(2), "eve, the second");
        let bad: Vec<usize> = d.errors.iter().map(|e| e.index).collect();
        assert_eq!(bad, [1, 3]);
        assert!(d.errors[0].reason.contains("two"), "{}", d.errors[0].reason);
    }
}
