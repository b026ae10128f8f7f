//! CSV records decoded into Arrow batches with arrow-csv.
//!
//! Each record is one CSV row, its fields in the order of the declared columns — or, for
//! files that start with a header line ([`CsvDecoder::with_header`]), in the header's order,
//! columns matched by name. As for JSON, the whole input is decoded in one pass; only when that fails is each record
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

use arrow::datatypes::{DataType, Field, Schema};

use super::json::{Decoded, RecordError};
use crate::error::Result;

/// Decodes CSV rows into batches of one schema.
#[derive(Debug, Clone)]
pub struct CsvDecoder {
    /// The rows' columns, in field order.
    schema: SchemaRef,
    /// With a header: the declared schema the rows are fitted to ([`super::fit`]).
    declared: Option<SchemaRef>,
}

impl CsvDecoder {
    /// A decoder producing `schema`, fields in its column order.
    pub fn new(schema: SchemaRef) -> Self {
        Self {
            schema,
            declared: None,
        }
    }

    /// A decoder of the rows after `header` (a file's first line) producing `declared`:
    /// columns by (case-insensitive) name, each read as its declared type — text when the
    /// header has a column not declared (left out) — a declared nullable column missing from
    /// the header is NULL. Fails, with why, when the header does not parse or lacks a
    /// `NOT NULL` column.
    pub fn with_header(declared: &SchemaRef, header: &[u8]) -> Result<Self, String> {
        let names = csv_header_names(header)?;
        let text = String::from_utf8_lossy(header);
        for f in declared.fields() {
            if !f.is_nullable() && !names.iter().any(|n| n == f.name()) {
                return Err(format!(
                    "the CSV header ({text}) has no column `{}`, which is NOT NULL",
                    f.name()
                ));
            }
        }
        let fields: Vec<Field> = names
            .iter()
            .map(|n| match declared.field_with_name(n) {
                Ok(f) => f.clone().with_nullable(true),
                Err(_) => Field::new(n, DataType::Utf8, true),
            })
            .collect();
        Ok(Self {
            schema: Arc::new(Schema::new(fields)),
            declared: Some(Arc::clone(declared)),
        })
    }

    /// Decodes `records` (each one CSV row, without a trailing newline).
    pub fn decode(&self, records: &[&[u8]]) -> Result<Decoded> {
        let decoded = self.decode_rows(records)?;
        let Some(declared) = &self.declared else {
            return Ok(decoded);
        };
        let (batch, unfit) = super::fit(declared, decoded.batch)?;
        if unfit.is_empty() {
            return Ok(Decoded {
                batch,
                errors: decoded.errors,
            });
        }
        // The rows are the records that decoded, in order.
        let mut errors = decoded.errors;
        let failed: Vec<usize> = errors.iter().map(|e| e.index).collect();
        let decoded_records: Vec<usize> = (0..records.len())
            .filter(|i| failed.binary_search(i).is_err())
            .collect();
        errors.extend(unfit.into_iter().map(|(row, reason)| RecordError {
            index: decoded_records[row],
            reason,
        }));
        errors.sort_by_key(|e| e.index);
        Ok(Decoded { batch, errors })
    }

    /// Decodes `records` into rows of [`Self::schema`].
    fn decode_rows(&self, records: &[&[u8]]) -> Result<Decoded> {
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

/// The column names of a CSV header line, lower-cased: read by the `csv` crate (arrow-csv's
/// own parser), so quoted names with commas or quotes in them come out whole.
fn csv_header_names(header: &[u8]) -> Result<Vec<String>, String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(header);
    let mut record = csv::StringRecord::new();
    match reader.read_record(&mut record) {
        // Spaces around a quoted name are not CSV, but writers produce them: taken as before.
        Ok(true) => Ok(record
            .iter()
            .map(|h| {
                let h = h.trim();
                let unquoted = h.strip_prefix('"').and_then(|h| h.strip_suffix('"'));
                unquoted.unwrap_or(h).to_lowercase()
            })
            .collect()),
        Ok(false) => Err("the CSV object has no header line".into()),
        Err(e) => Err(format!("the CSV header line does not parse: {e}")),
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

    #[test]
    fn quoted_header_names_keep_their_commas() {
        assert_eq!(
            csv_header_names(b"id, \"Amount\" ,\"city, state\",\"say \"\"hi\"\"\"").unwrap(),
            vec!["id", "amount", "city, state", "say \"hi\""]
        );
        assert!(csv_header_names(b"").is_err());
    }

    #[test]
    fn a_header_names_the_columns_and_rows_are_fitted_to_the_declared_ones() {
        let declared = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
            Field::new("score", DataType::Float64, true),
        ]));
        let d = CsvDecoder::with_header(&declared, b"Name,extra,ID").unwrap();
        let records: Vec<&[u8]> = vec![b"alice,x,1", b"bob,y,two", b"carol,z,3", b"dave,w,"];
        let d = d.decode(&records).unwrap();
        assert_eq!(d.batch.schema(), declared);
        let ids = d
            .batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert_eq!(ids.values(), &[1, 3]);
        assert!(
            d.batch.column(2).is_null(0),
            "a column the header lacks is NULL"
        );
        let bad: Vec<usize> = d.errors.iter().map(|e| e.index).collect();
        assert_eq!(bad, [1, 3]);
        assert!(
            d.errors[0].reason.contains("'two'"),
            "{}",
            d.errors[0].reason
        );
        assert_eq!(d.errors[1].reason, "column `id` is NOT NULL");
        let err = CsvDecoder::with_header(&declared, b"name,score").unwrap_err();
        assert!(err.contains("no column `id`, which is NOT NULL"), "{err}");
    }
}
