//! Avro records in the Confluent wire format (magic byte `0`, 4-byte big-endian schema id,
//! Avro binary body), decoded with arrow-avro into batches of the declared schema.
//!
//! Writer schemas are fetched from the schema registry by id the first time an id is seen,
//! then cached; each id gets its own arrow-avro decoder, kept across batches.
//!
//! Schema resolution (the declared columns are the reader schema):
//! - columns are matched to the writer's top-level fields by name (exactly, else ignoring
//!   case); writer fields no column asks for are skipped without being materialised;
//! - a declared column the writer schema lacks is NULL (as an Avro reader field with a
//!   `null` default); when it is `NOT NULL`, every record of that writer schema is rejected;
//! - values are converted to the declared type like `CAST` (`int` → `BIGINT`, `string` →
//!   `TIMESTAMP`, `timestamp-millis` → `TIMESTAMP`, …); a pair of types that cannot convert
//!   rejects the writer schema's records, a value that does not convert rejects its record.
//!
//! A record that is not framed as above, names an id the registry does not have, does not
//! decode with its writer schema, or has NULL in a `NOT NULL` column is reported with its
//! reason; the others go on.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, new_null_array};
use arrow::compute::{cast, concat_batches, filter_record_batch};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow_avro::reader::{Decoder as AvroRowDecoder, ReaderBuilder};
use arrow_avro::schema::{AvroSchema, Fingerprint, FingerprintAlgorithm, SchemaStore};

use super::json::{Decoded, RecordError};
use super::registry::SchemaRegistry;
use crate::error::Result;

/// Length of the Confluent framing: magic byte and schema id.
const HEADER: usize = 5;

/// Decodes Confluent-framed Avro records into batches of one schema.
#[derive(Debug)]
pub struct AvroDecoder {
    schema: SchemaRef,
    registry: SchemaRegistry,
    /// Per writer schema id: how to decode its records, or why they cannot be.
    writers: HashMap<u32, Result<Writer, String>>,
}

/// What is known of one writer schema.
#[derive(Debug)]
struct Writer {
    id: u32,
    json: String,
    /// The writer's fields decoded, by index, in the order they appear in the output.
    projection: Vec<usize>,
    /// For each declared column: its index in the decoded batch, or `None` (all NULL).
    columns: Vec<Option<usize>>,
    decoder: AvroRowDecoder,
}

impl Writer {
    /// Resolves writer schema `id` (`json`) against the declared `schema`.
    fn resolve(id: u32, json: String, schema: &SchemaRef) -> Result<Self, String> {
        let parsed: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| format!("invalid Avro schema JSON: {e}"))?;
        let fields: Vec<&str> = parsed
            .get("fields")
            .and_then(|f| f.as_array())
            .filter(|_| parsed.get("type").and_then(|t| t.as_str()) == Some("record"))
            .ok_or_else(|| "it is not an Avro record".to_string())?
            .iter()
            .map(|f| f.get("name").and_then(|n| n.as_str()).unwrap_or_default())
            .collect();
        let mut projection = Vec::new();
        let mut columns = Vec::with_capacity(schema.fields().len());
        for f in schema.fields() {
            let found = fields
                .iter()
                .position(|w| *w == f.name())
                .or_else(|| fields.iter().position(|w| w.eq_ignore_ascii_case(f.name())));
            match found {
                Some(i) => {
                    columns.push(Some(projection.len()));
                    projection.push(i);
                }
                None if f.is_nullable() => columns.push(None),
                None => {
                    return Err(format!(
                        "column `{}` is NOT NULL but the writer schema has no such field",
                        f.name()
                    ));
                }
            }
        }
        let decoder = Self::decoder(id, &json, &projection)?;
        let decoded = decoder.schema();
        for (f, column) in schema.fields().iter().zip(&columns) {
            let Some(i) = column else { continue };
            let from = decoded.field(*i).data_type();
            if !arrow::compute::can_cast_types(from, f.data_type()) {
                return Err(format!(
                    "field `{}` ({from}) cannot be read as column `{}` ({})",
                    decoded.field(*i).name(),
                    f.name(),
                    f.data_type()
                ));
            }
        }
        Ok(Self {
            id,
            json,
            projection,
            columns,
            decoder,
        })
    }

    fn decoder(id: u32, json: &str, projection: &[usize]) -> Result<AvroRowDecoder, String> {
        let mut store = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
        store
            .set(Fingerprint::Id(id), AvroSchema::new(json.to_string()))
            .map_err(|e| e.to_string())?;
        ReaderBuilder::new()
            .with_batch_size(usize::MAX / 2)
            .with_writer_schema_store(store)
            .with_projection(projection.to_vec())
            .build_decoder()
            .map_err(|e| e.to_string())
    }

    /// A fresh decoder (after one failed mid-record, its state is unknown).
    fn reset(&mut self) {
        self.decoder = Self::decoder(self.id, &self.json, &self.projection)
            .expect("the same schema built a decoder before");
    }

    /// Decodes `records` (all framed with this writer's id) together; fails on the first
    /// record that does not decode, leaving the decoder reset.
    fn decode_all(&mut self, records: &[&[u8]]) -> Result<RecordBatch, String> {
        for r in records {
            if let Err(e) = self.decode_one(r) {
                self.reset();
                return Err(e);
            }
        }
        let batch = self.decoder.flush().map_err(|e| e.to_string());
        match batch {
            Ok(Some(batch)) => Ok(batch),
            Ok(None) => Ok(RecordBatch::new_empty(self.decoder.schema())),
            Err(e) => {
                self.reset();
                Err(e)
            }
        }
    }

    /// Feeds one whole record; checks it is exactly one row.
    fn decode_one(&mut self, record: &[u8]) -> Result<(), String> {
        let before = self.decoder.capacity();
        let consumed = self.decoder.decode(record).map_err(|e| e.to_string())?;
        let rows = before - self.decoder.capacity();
        if consumed != record.len() || rows != 1 {
            return Err(if rows == 0 {
                "the Avro body ends before the record does (truncated?)".to_string()
            } else {
                format!(
                    "{} bytes follow the Avro record",
                    record.len().saturating_sub(consumed)
                )
            });
        }
        Ok(())
    }
}

impl AvroDecoder {
    /// A decoder producing `schema`, fetching writer schemas from `registry`.
    pub fn new(schema: SchemaRef, registry: SchemaRegistry) -> Self {
        Self {
            schema,
            registry,
            writers: HashMap::new(),
        }
    }

    /// Decodes `records`: the good ones into one batch (in input order), the bad ones with
    /// their reasons. Fails only when the registry cannot be reached.
    pub async fn decode(&mut self, records: &[&[u8]]) -> Result<Decoded> {
        // The schema id of each record, or why it has none.
        let ids: Vec<Result<u32, String>> = records.iter().map(|r| schema_id(r)).collect();
        for id in ids.iter().flatten() {
            if !self.writers.contains_key(id) {
                let writer = match self.registry.schema_by_id(*id).await? {
                    None => Err(format!(
                        "schema id {id} is not in the schema registry {}",
                        self.registry.url()
                    )),
                    Some(json) => Writer::resolve(*id, json, &self.schema)
                        .map_err(|e| format!("writer schema id {id}: {e}")),
                };
                if let Err(reason) = &writer {
                    tracing::warn!("avro: {reason}");
                }
                self.writers.insert(*id, writer);
            }
        }
        let mut errors = Vec::new();
        let mut parts = Vec::new();
        // Runs of consecutive records with one schema id, decoded together.
        let mut start = 0;
        while start < records.len() {
            let mut end = start + 1;
            while end < records.len() && ids[end] == ids[start] {
                end += 1;
            }
            let run = &records[start..end];
            match &ids[start] {
                Err(reason) => errors.extend((start..end).map(|index| RecordError {
                    index,
                    reason: reason.clone(),
                })),
                Ok(id) => match self.writers.get_mut(id).expect("fetched above") {
                    Err(reason) => errors.extend((start..end).map(|index| RecordError {
                        index,
                        reason: reason.clone(),
                    })),
                    Ok(writer) => {
                        let (batch, bad) = decode_run(writer, run)?;
                        errors.extend(bad.into_iter().map(|e| RecordError {
                            index: start + e.index,
                            reason: e.reason,
                        }));
                        let (batch, bad) =
                            fit(&self.schema, writer, batch, run.len(), &errors, start)?;
                        errors.extend(bad);
                        parts.push(batch);
                    }
                },
            }
            start = end;
        }
        errors.sort_by_key(|e| e.index);
        let batch = concat_batches(&self.schema, &parts)?;
        Ok(Decoded { batch, errors })
    }
}

/// The decoded `batch` of a run beginning at record `start` (its rows: the run's records not
/// in `errors`) in the declared `schema`; the records rejected doing so.
fn fit(
    schema: &SchemaRef,
    writer: &Writer,
    batch: RecordBatch,
    run_len: usize,
    errors: &[RecordError],
    start: usize,
) -> Result<(RecordBatch, Vec<RecordError>)> {
    let rows = batch.num_rows();
    let mut ok = vec![true; rows];
    let mut reasons: Vec<Option<String>> = vec![None; rows];
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (f, column) in schema.fields().iter().zip(&writer.columns) {
        let made = match column {
            None => new_null_array(f.data_type(), rows),
            Some(i) => {
                let from = batch.column(*i);
                let to = cast_or_null(from, f.data_type())?;
                for row in 0..rows {
                    if from.is_valid(row) && to.is_null(row) && reasons[row].is_none() {
                        ok[row] = false;
                        reasons[row] = Some(format!(
                            "column `{}`: the value does not fit {}",
                            f.name(),
                            f.data_type()
                        ));
                    }
                }
                to
            }
        };
        if !f.is_nullable() && made.null_count() > 0 {
            for row in 0..rows {
                if made.is_null(row) && reasons[row].is_none() {
                    ok[row] = false;
                    reasons[row] = Some(format!("column `{}` is NOT NULL", f.name()));
                }
            }
        }
        columns.push(made);
    }
    let fitted = RecordBatch::try_new(Arc::clone(schema), columns)?;
    if ok.iter().all(|ok| *ok) {
        return Ok((fitted, vec![]));
    }
    // Row `row` of the batch is the run's `row`-th record that decoded.
    let decoded_indexes: Vec<usize> = (start..start + run_len)
        .filter(|i| errors.binary_search_by_key(i, |e| e.index).is_err())
        .collect();
    let rejected = reasons
        .into_iter()
        .enumerate()
        .filter_map(|(row, reason)| {
            reason.map(|reason| RecordError {
                index: decoded_indexes[row],
                reason,
            })
        })
        .collect();
    let kept = filter_record_batch(&fitted, &BooleanArray::from(ok))?;
    Ok((kept, rejected))
}

/// Decodes a run of records of one writer: all together when they all decode; otherwise each
/// on its own to find the bad ones (with their run-relative indexes), then the good together.
fn decode_run(writer: &mut Writer, run: &[&[u8]]) -> Result<(RecordBatch, Vec<RecordError>)> {
    if let Ok(batch) = writer.decode_all(run) {
        return Ok((batch, vec![]));
    }
    let mut good = Vec::with_capacity(run.len());
    let mut bad = Vec::new();
    for (index, r) in run.iter().enumerate() {
        match writer.decode_all(std::slice::from_ref(r)) {
            Ok(_) => good.push(*r),
            Err(reason) => bad.push(RecordError {
                index,
                reason: format!(
                    "Avro body does not decode with writer schema id {}: {reason}",
                    writer.id
                ),
            }),
        }
    }
    let batch = writer.decode_all(&good).map_err(|e| {
        sluice_engine::EngineError::Internal(format!(
            "avro records that decode one by one failed together: {e}"
        ))
    })?;
    Ok((batch, bad))
}

/// The schema id of a Confluent-framed record.
fn schema_id(record: &[u8]) -> Result<u32, String> {
    match record {
        [0, a, b, c, d, ..] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        _ if record.len() < HEADER => Err(format!(
            "a {}-byte value cannot be Confluent-framed Avro (magic byte 0, 4-byte schema id, body)",
            record.len()
        )),
        _ => Err(format!(
            "not Confluent-framed Avro: the first byte is {:#04x}, not the magic byte 0",
            record[0]
        )),
    }
}

/// `array` cast to `to`; values that do not convert become NULL.
fn cast_or_null(array: &ArrayRef, to: &DataType) -> Result<ArrayRef> {
    if array.data_type() == to {
        return Ok(Arc::clone(array));
    }
    Ok(cast(array, to)?)
}

#[cfg(test)]
mod tests {
    use arrow::array::{AsArray, Int64Array};
    use arrow::datatypes::{Field, Int64Type, Schema};

    use super::*;

    const WRITER: &str = r#"{"type":"record","name":"R","fields":[
        {"name":"Id","type":"long"},{"name":"extra","type":"string"},{"name":"n","type":"int"}]}"#;

    fn declared(fields: Vec<Field>) -> SchemaRef {
        Arc::new(Schema::new(fields))
    }

    /// A record of `WRITER`: Confluent header, then zig-zag varints and a string.
    fn record(id: i64, n: i64) -> Vec<u8> {
        let zigzag = |v: i64| ((v << 1) ^ (v >> 63)) as u8; // small values: one byte
        vec![0, 0, 0, 0, 7, zigzag(id), zigzag(1), b'x', zigzag(n)]
    }

    #[test]
    fn schema_ids_come_from_the_confluent_header() {
        assert_eq!(schema_id(&[0, 0, 0, 1, 2, 9]), Ok(258));
        assert!(schema_id(&[0, 0, 1]).unwrap_err().contains("3-byte value"));
        assert!(schema_id(b"{\"a\":1}").unwrap_err().contains("0x7b"));
    }

    #[test]
    fn columns_resolve_by_name_and_missing_not_null_columns_reject_the_writer() {
        let schema = declared(vec![
            Field::new("n", DataType::Int64, false),
            Field::new("id", DataType::Int64, false),
            Field::new("note", DataType::Utf8, true),
        ]);
        let w = Writer::resolve(7, WRITER.to_string(), &schema).unwrap();
        // `n` is writer field 2, `id` matches `Id` ignoring case; `extra` is not decoded.
        assert_eq!(w.projection, vec![2, 0]);
        assert_eq!(w.columns, vec![Some(0), Some(1), None]);

        let strict = declared(vec![Field::new("note", DataType::Utf8, false)]);
        let e = Writer::resolve(7, WRITER.to_string(), &strict).unwrap_err();
        assert!(e.contains("`note` is NOT NULL"), "{e}");
        let unfit = declared(vec![Field::new(
            "extra",
            DataType::Struct(vec![Field::new("a", DataType::Int64, true)].into()),
            true,
        )]);
        let e = Writer::resolve(7, WRITER.to_string(), &unfit).unwrap_err();
        assert!(e.contains("cannot be read as column `extra`"), "{e}");
        let e = Writer::resolve(7, r#""long""#.to_string(), &schema).unwrap_err();
        assert!(e.contains("not an Avro record"), "{e}");
    }

    #[test]
    fn a_run_with_a_broken_record_keeps_the_others_in_order() {
        let schema = declared(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("n", DataType::Int64, false),
        ]);
        let mut w = Writer::resolve(7, WRITER.to_string(), &schema).unwrap();
        let truncated = record(2, 20)[..7].to_vec();
        let mut trailing = record(3, 30);
        trailing.push(42);
        let records = [record(1, 10), truncated, trailing, record(4, 40)];
        let run: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
        let (batch, bad) = decode_run(&mut w, &run).unwrap();
        let bad: Vec<usize> = bad.iter().map(|e| e.index).collect();
        assert_eq!(bad, vec![1, 2]);
        let (fitted, rejected) = fit(&schema, &w, batch, run.len(), &[], 0)
            .unwrap_or_else(|_| unreachable!("indexes only matter when rows are rejected"));
        assert!(rejected.is_empty());
        assert_eq!(
            fitted.column(0).as_primitive::<Int64Type>(),
            &Int64Array::from(vec![1, 4])
        );
        assert_eq!(
            fitted.column(1).as_primitive::<Int64Type>(),
            &Int64Array::from(vec![10, 40])
        );
        // The decoder is still good for the next batch.
        let again = [record(5, 50)];
        let run: Vec<&[u8]> = again.iter().map(Vec::as_slice).collect();
        let (batch, bad) = decode_run(&mut w, &run).unwrap();
        assert!(bad.is_empty());
        assert_eq!(batch.num_rows(), 1);
    }
}
