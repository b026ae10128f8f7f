//! JSON records decoded into Arrow batches.
//!
//! Three paths, fastest first. Flat objects of scalar columns, the common case, are decoded
//! by `flat` in one pass over each record. An input it is not sure of (see its docs) is
//! decoded whole by arrow-json's decoder, which sets the rules. Only when that fails is each
//! record decoded on its own, to tell the good records from the bad ones and say why each
//! bad one failed; the good ones are then decoded together again.
//!
//! Decoding rules (arrow-json's): fields not in the schema are ignored; a missing or `null`
//! field is NULL, which a `NOT NULL` column rejects; timestamps are RFC 3339 strings
//! (`2024-05-01T12:00:00Z`, `2024-05-01 12:00:00`) or integers in epoch microseconds.
//!
//! A record that nests arrays and objects deeper than [`MAX_DEPTH`] is rejected before
//! arrow-json sees it: its decoder and error messages recurse into nested values, and a
//! few hundred thousand brackets (well within a request's size) would overflow the stack.

use arrow::datatypes::SchemaRef;
use arrow::json::ReaderBuilder;
use arrow::record_batch::RecordBatch;

use crate::error::Result;

mod flat;

/// How deep a record may nest arrays and objects (the record's own object is level 1).
pub const MAX_DEPTH: usize = 64;

/// The longest reason a rejected record gets: arrow-json quotes the offending value, which
/// may be most of the record.
const MAX_REASON: usize = 300;

/// After the fast path turned down an input, this many inputs go straight to arrow-json
/// before it is tried again (so that a source whose records it never takes loses little).
const FAST_PATH_BACKOFF: u32 = 8;

/// A record that failed to decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    /// Index of the record in the input (0-based).
    pub index: usize,
    /// Why it failed, for a human.
    pub reason: String,
}

/// The result of decoding a set of records.
#[derive(Debug)]
pub struct Decoded {
    /// The good records, in input order.
    pub batch: RecordBatch,
    /// The bad ones.
    pub errors: Vec<RecordError>,
}

/// Decodes JSON objects into batches of one schema.
#[derive(Debug)]
pub struct JsonDecoder {
    schema: SchemaRef,
    /// The fast path, if the schema's columns allow it (boxed: it is large, and the
    /// decoder is moved around inside other enums).
    flat: Option<Box<flat::FlatDecoder>>,
    /// Inputs left to send straight to arrow-json (see [`FAST_PATH_BACKOFF`]).
    flat_backoff: std::sync::atomic::AtomicU32,
    /// arrow-json's decoder of the last whole input that decoded cleanly, kept so that its
    /// buffers keep their capacity; taken by one call at a time (a concurrent call builds
    /// its own).
    reused: std::sync::Mutex<Option<Reused>>,
}

/// A kept arrow-json decoder and the most rows it takes in one flush.
struct Reused {
    decoder: arrow::json::reader::Decoder,
    rows: usize,
}

impl std::fmt::Debug for Reused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reused").field("rows", &self.rows).finish()
    }
}

impl Clone for JsonDecoder {
    fn clone(&self) -> Self {
        Self::new(std::sync::Arc::clone(&self.schema))
    }
}

impl JsonDecoder {
    /// A decoder producing `schema`.
    pub fn new(schema: SchemaRef) -> Self {
        Self {
            flat: flat::FlatDecoder::new(&schema).map(Box::new),
            flat_backoff: std::sync::atomic::AtomicU32::new(0),
            schema,
            reused: std::sync::Mutex::new(None),
        }
    }

    /// Decodes `records` (each one JSON object).
    pub fn decode(&self, records: &[&[u8]]) -> Result<Decoded> {
        if let Some(batch) = self.decode_flat(records) {
            return in_range(batch, (0..records.len()).collect(), vec![]);
        }
        // Checked only off the fast path, which takes strict JSON without nested values:
        // arrow-json's tokenizer recurses into nested values and lets through what is not
        // JSON (trailing or missing commas, leading zeros, raw control characters).
        let refused: Vec<Option<String>> = records.iter().map(|r| not_json(r)).collect();
        if refused.iter().all(Option::is_none)
            && let Ok(batch) = self.decode_whole(records)
        {
            return in_range(batch, (0..records.len()).collect(), vec![]);
        }
        let mut good = Vec::with_capacity(records.len());
        let mut rows = Vec::with_capacity(records.len());
        let mut errors = Vec::new();
        for (index, (r, refused)) in records.iter().zip(refused).enumerate() {
            if let Some(reason) = refused {
                errors.push(RecordError { index, reason });
                continue;
            }
            match self.decode_all(std::slice::from_ref(r)) {
                Ok(_) => {
                    good.push(*r);
                    rows.push(index);
                }
                Err(reason) => errors.push(RecordError { index, reason }),
            }
        }
        let batch = self.decode_all(&good).map_err(|e| {
            sluice_engine::EngineError::Internal(format!(
                "records that decode one by one failed together: {e}"
            ))
        })?;
        in_range(batch, rows, errors)
    }

    /// The fast path's batch, unless it is off or turned `records` down.
    fn decode_flat(&self, records: &[&[u8]]) -> Option<RecordBatch> {
        use std::sync::atomic::Ordering::Relaxed;
        let flat = self.flat.as_ref()?;
        let backoff = self.flat_backoff.load(Relaxed);
        if backoff > 0 {
            self.flat_backoff.store(backoff - 1, Relaxed);
            return None;
        }
        let batch = flat.decode(records);
        if batch.is_none() {
            self.flat_backoff.store(FAST_PATH_BACKOFF, Relaxed);
        }
        batch
    }

    /// [`Self::decode_all`] with the kept arrow-json decoder (or a new one, kept when
    /// this input decodes cleanly).
    fn decode_whole(&self, records: &[&[u8]]) -> Result<RecordBatch, String> {
        let Ok(mut slot) = self.reused.try_lock() else {
            return self.decode_all(records);
        };
        let mut reused = match slot.take() {
            Some(r) if r.rows >= records.len() => r,
            _ => Reused {
                decoder: self.arrow_decoder(records.len())?,
                rows: records.len().max(1),
            },
        };
        // A failed decode leaves the decoder mid-record: it is dropped, not kept.
        let batch = self.decode_with(&mut reused.decoder, records)?;
        *slot = Some(reused);
        Ok(batch)
    }

    fn arrow_decoder(&self, rows: usize) -> Result<arrow::json::reader::Decoder, String> {
        ReaderBuilder::new(std::sync::Arc::clone(&self.schema))
            .with_batch_size(rows.max(1))
            .build_decoder()
            .map_err(|e| e.to_string())
    }

    fn decode_all(&self, records: &[&[u8]]) -> Result<RecordBatch, String> {
        let mut decoder = self.arrow_decoder(records.len())?;
        self.decode_with(&mut decoder, records)
    }

    /// Decodes `records` with `decoder` (which takes at least as many rows, and is empty).
    fn decode_with(
        &self,
        decoder: &mut arrow::json::reader::Decoder,
        records: &[&[u8]],
    ) -> Result<RecordBatch, String> {
        for r in records {
            // Whitespace around the value is no part of it (arrow-json would leave what
            // follows the last row of a batch unread).
            let r = trim_json_whitespace(r);
            if !r.starts_with(b"{") {
                return Err("not a JSON object".to_string());
            }
            let n = decoder.decode(r).map_err(|e| explain(&e.to_string()))?;
            if n != r.len() {
                return Err("more than one JSON value in a record".to_string());
            }
            // A newline ends the value, so that two records never merge.
            decoder.decode(b"\n").map_err(|e| explain(&e.to_string()))?;
        }
        let batch = decoder
            .flush()
            .map_err(|e| explain(&e.to_string()))?
            .unwrap_or_else(|| RecordBatch::new_empty(std::sync::Arc::clone(&self.schema)));
        // An unterminated record would swallow the next one; the row count catches that.
        if batch.num_rows() != records.len() {
            return Err("incomplete JSON object".to_string());
        }
        Ok(batch)
    }
}

/// `record` without the JSON whitespace (space, tab, CR, LF) at its ends.
fn trim_json_whitespace(record: &[u8]) -> &[u8] {
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let start = record.iter().position(|b| !ws(b)).unwrap_or(record.len());
    let end = record.iter().rposition(|b| !ws(b)).map_or(start, |i| i + 1);
    &record[start..end]
}

/// Why `record` is refused before decoding, if it is: it nests deeper than [`MAX_DEPTH`],
/// or it is not JSON by the spec (RFC 8259).
fn not_json(record: &[u8]) -> Option<String> {
    if nests_too_deep(record) {
        return Some(format!(
            "the record nests arrays and objects deeper than {MAX_DEPTH} levels"
        ));
    }
    // serde_json's parser is strict and, within the depth checked above, recursion-safe.
    serde_json::from_slice::<serde::de::IgnoredAny>(record)
        .err()
        .map(|e| explain(&format!("not valid JSON: {e}")))
}

/// The earliest and latest instants a timestamp column takes: years 0001 to 9999 (what
/// RFC 3339 text can say, and what Athena, DuckDB and pyarrow convert), in µs.
const TIMESTAMP_RANGE_MICROS: std::ops::RangeInclusive<i64> =
    -62_135_596_800_000_000..=253_402_300_799_999_999;

/// Moves the rows of `batch` with a timestamp outside [`TIMESTAMP_RANGE_MICROS`] to
/// `errors` (arrow-json clamps numbers too large for a timestamp instead of refusing them).
/// `rows[i]` is the record index of the batch's row `i`.
fn in_range(batch: RecordBatch, rows: Vec<usize>, mut errors: Vec<RecordError>) -> Result<Decoded> {
    use arrow::array::{AsArray, BooleanArray};
    use arrow::datatypes::{DataType, TimeUnit};
    let mut bad: Option<Vec<bool>> = None;
    for (column, field) in batch.columns().iter().zip(batch.schema().fields()) {
        let DataType::Timestamp(unit, _) = field.data_type() else {
            continue;
        };
        // Raw values in the column's unit, and that unit's µs (nanoseconds: 1/1000).
        let (num, den): (i128, i128) = match unit {
            TimeUnit::Second => (1_000_000, 1),
            TimeUnit::Millisecond => (1_000, 1),
            TimeUnit::Microsecond => (1, 1),
            TimeUnit::Nanosecond => (1, 1_000),
        };
        let values = arrow::compute::cast(column, &DataType::Int64)?;
        let values = values.as_primitive::<arrow::datatypes::Int64Type>();
        let in_range = |v: i64| {
            let micros = i128::from(v) * num / den;
            micros >= i128::from(*TIMESTAMP_RANGE_MICROS.start())
                && micros <= i128::from(*TIMESTAMP_RANGE_MICROS.end())
        };
        // The common case, checked with two vectorised passes: every value is in range.
        let (min, max) = (arrow::compute::min(values), arrow::compute::max(values));
        if min.is_none_or(in_range) && max.is_none_or(in_range) {
            continue;
        }
        for (row, v) in values.iter().enumerate() {
            let Some(v) = v else { continue };
            if !in_range(v) {
                let bad = bad.get_or_insert_with(|| vec![false; batch.num_rows()]);
                if !bad[row] {
                    bad[row] = true;
                    errors.push(RecordError {
                        index: rows[row],
                        reason: format!(
                            "field '{}': timestamp out of range (years 0001 to 9999)",
                            field.name()
                        ),
                    });
                }
            }
        }
    }
    let Some(bad) = bad else {
        return Ok(Decoded { batch, errors });
    };
    errors.sort_by_key(|e| e.index);
    let keep = BooleanArray::from(bad.iter().map(|b| !b).collect::<Vec<_>>());
    let batch = arrow::compute::filter_record_batch(&batch, &keep)?;
    Ok(Decoded { batch, errors })
}

/// Whether `record` nests arrays and objects deeper than [`MAX_DEPTH`] (brackets inside
/// strings do not count). One pass, no recursion.
fn nests_too_deep(record: &[u8]) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in record {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Rewords arrow-json's messages where they would puzzle a user, and keeps them short.
fn explain(message: &str) -> String {
    let mut reason = reword(message);
    if reason.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push('…');
    }
    reason
}

fn reword(message: &str) -> String {
    let m = message.strip_prefix("Json error: ").unwrap_or(message);
    // arrow-json names the column inside a `Field` debug print, e.g.
    // `… non-nullable StructArray child: Field { "id": Utf8 }`.
    let name_at = ["Field { \"", "name: \""]
        .iter()
        .find_map(|p| m.find(p).map(|i| i + p.len()));
    if m.contains("non-nullable")
        && let Some(start) = name_at
    {
        let rest = &m[start..];
        if let Some(end) = rest.find('"') {
            return format!("missing value for NOT NULL column `{}`", &rest[..end]);
        }
    }
    m.to_string()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

    use super::*;

    fn decoder() -> JsonDecoder {
        JsonDecoder::new(Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("amount", DataType::Float64, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
        ])))
    }

    #[test]
    fn good_records_decode_in_one_pass() {
        let recs: Vec<&[u8]> = vec![
            br#"{"id":"a","amount":1.5,"ts":"2024-05-01T12:00:00Z"}"#,
            br#"{"id":"b","ts":"2024-05-01 12:00:01","extra":true}"#,
        ];
        let d = decoder().decode(&recs).unwrap();
        assert_eq!(d.batch.num_rows(), 2);
        assert!(d.errors.is_empty());
    }

    #[test]
    fn bad_records_are_isolated_with_reasons() {
        let recs: Vec<&[u8]> = vec![
            br#"{"id":"a","amount":1.5,"ts":"2024-05-01T12:00:00Z"}"#,
            br#"{"id":"b","amount":"lots","ts":"2024-05-01T12:00:00Z"}"#,
            br#"{"amount":2,"ts":"2024-05-01T12:00:00Z"}"#,
            br#"{"id":"c", "#,
            br#"[1,2]"#,
            br#"{"id":"d","ts":"2024-05-01T12:00:03Z"}"#,
        ];
        let d = decoder().decode(&recs).unwrap();
        assert_eq!(d.batch.num_rows(), 2);
        let idx: Vec<usize> = d.errors.iter().map(|e| e.index).collect();
        assert_eq!(idx, vec![1, 2, 3, 4]);
        assert!(
            d.errors[0].reason.contains("amount"),
            "{}",
            d.errors[0].reason
        );
        assert_eq!(d.errors[1].reason, "missing value for NOT NULL column `id`");
        assert_eq!(d.errors[3].reason, "not a JSON object");
    }

    #[test]
    fn records_nested_too_deep_are_rejected_without_recursing() {
        let deep = |levels: usize, open: &str, close: &str| {
            format!(
                r#"{{"id":"x","amount":{}1{},"ts":"2024-05-01T12:00:00Z"}}"#,
                open.repeat(levels),
                close.repeat(levels)
            )
        };
        // 2 000 000 levels: far past what would overflow a recursive decoder.
        let arrays = deep(2_000_000, "[", "]");
        let objects = deep(200_000, r#"{"a":"#, "}");
        // Exactly the limit (the record's object is level 1) is decoded as usual: here it
        // is a type error, not a depth one.
        let at_limit = deep(MAX_DEPTH - 1, "[", "]");
        // Brackets inside strings are text.
        let in_string = format!(
            r#"{{"id":"{}","ts":"2024-05-01T12:00:00Z"}}"#,
            "[".repeat(1000)
        );
        let recs: Vec<&[u8]> = vec![
            arrays.as_bytes(),
            objects.as_bytes(),
            at_limit.as_bytes(),
            in_string.as_bytes(),
        ];
        let d = decoder().decode(&recs).unwrap();
        assert_eq!(
            d.batch.num_rows(),
            1,
            "the record with brackets in a string"
        );
        let reasons: Vec<(usize, &str)> = d
            .errors
            .iter()
            .map(|e| (e.index, e.reason.as_str()))
            .collect();
        let too_deep = "the record nests arrays and objects deeper than 64 levels";
        assert_eq!(reasons[0], (0, too_deep));
        assert_eq!(reasons[1], (1, too_deep));
        assert_eq!(reasons[2].0, 2);
        assert_ne!(reasons[2].1, too_deep);
        // Reasons quote little of the record.
        assert!(
            reasons[2].1.len() <= MAX_REASON + '…'.len_utf8(),
            "{}",
            reasons[2].1
        );
    }
}

#[cfg(test)]
mod strictness_tests {
    use std::sync::Arc;

    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

    use super::*;

    fn decoder() -> JsonDecoder {
        JsonDecoder::new(Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("s", DataType::Utf8, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
        ])))
    }

    /// What JSON (RFC 8259) refuses is refused, whichever path decodes the input; so are
    /// timestamps arrow-json would clamp.
    #[test]
    fn what_is_not_json_or_out_of_range_is_rejected() {
        let bad: Vec<&[u8]> = vec![
            br#"{"a":1,}"#,
            br#"{"a":1 "s":"x"}"#,
            br#"{"a":01}"#,
            b"{\"s\":\"a\x00b\"}",
            b"{\"s\":\"a\tb\"}",
            br#"{"a":1,,"s":"x"}"#,
            br#"{,"a":1}"#,
            br#"{"a":1}}"#,
            br#"{"s":"\x"}"#,
            br#"{"a":+1}"#,
            br#"{"a":.5}"#,
            br#"{"ts":9223372036854775808}"#,
            br#"{"ts":1e30}"#,
            br#"{"ts":-9223372036854775808}"#,
            br#"{"ts":253402300800000000}"#,
        ];
        let good: Vec<&[u8]> = vec![
            br#"{"a":-0,"s":"tab\tescaped","ts":"2024-05-01T00:00:00Z"}"#,
            br#"{"ts":253402300799999999}"#,
            br#"{"ts":-62135596800000000, "nested": {"x": [1, 2]}}"#,
        ];
        // Alone, and mixed with good records (the fast path declines the whole input then).
        for r in &bad {
            let d = decoder().decode(&[r]).unwrap();
            assert_eq!(d.batch.num_rows(), 0, "{}", String::from_utf8_lossy(r));
            assert_eq!(d.errors.len(), 1);
        }
        let mut all = good.clone();
        all.extend(&bad);
        let d = decoder().decode(&all).unwrap();
        assert_eq!(d.batch.num_rows(), good.len());
        let rejected: Vec<usize> = d.errors.iter().map(|e| e.index).collect();
        assert_eq!(rejected, (good.len()..all.len()).collect::<Vec<_>>());
        let range = d
            .errors
            .iter()
            .filter(|e| e.reason.contains("timestamp out of range"))
            .count();
        assert_eq!(range, 4, "{:?}", d.errors);
    }
}
