//! Operators: stateless ones evaluate DataFusion physical expressions on whole batches;
//! [`WindowAggregate`] keeps DataFusion accumulators per event-time window.
//!
//! Evaluation is non-strict: when an expression fails on a batch (a cast that cannot parse
//! one row, say), the batch is evaluated again row by row; the rows that fail go to the
//! errors zone with the reason, the others continue. The slow path runs only for batches
//! that hold a bad row.

mod filter;
mod projection;
mod window_aggregate;

pub use filter::Filter;
pub use projection::Projection;
pub use window_aggregate::{WindowAggregate, WindowAggregateSpec};

use arrow::record_batch::RecordBatch;

use crate::message::BadRecord;

/// Renders row `row` of `batch` as one JSON object, for the errors zone.
pub fn row_to_json(batch: &RecordBatch, row: usize) -> String {
    let slice = batch.slice(row, 1);
    let mut buf = Vec::new();
    let mut writer = arrow::json::LineDelimitedWriter::new(&mut buf);
    let written = writer.write(&slice).and_then(|_| writer.finish());
    match written {
        Ok(()) => String::from_utf8_lossy(&buf).trim_end().to_string(),
        Err(e) => format!("{{\"unrenderable_row\": {:?}}}", e.to_string()),
    }
}

/// A bad record for row `row` of `batch`, rejected by the operator `origin` because of
/// `reason`.
pub(crate) fn bad_row(batch: &RecordBatch, row: usize, origin: &str, reason: &str) -> BadRecord {
    BadRecord {
        payload: row_to_json(batch, row),
        reason: reason.to_string(),
        origin: origin.to_string(),
    }
}
