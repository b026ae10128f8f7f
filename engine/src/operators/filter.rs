//! `Filter`: keeps the rows for which a predicate is true.
//!
//! State: none. Emits: for each input batch, the rows whose predicate is `true` (`NULL`
//! and `false` drop the row, as SQL's `WHERE`). Watermarks and barriers pass unchanged.

use std::sync::Arc;

use arrow::array::{Array, BooleanArray};
use arrow::compute::filter_record_batch;
use arrow::record_batch::RecordBatch;
use datafusion::physical_expr::PhysicalExpr;

use super::evaluate_or_reject;
use crate::checkpoint::OperatorState;
use crate::error::{EngineError, Result};
use crate::operator::{Collector, Operator};

/// Keeps the rows of each batch for which `predicate` evaluates to `true`.
#[derive(Debug)]
pub struct Filter {
    predicate: Arc<dyn PhysicalExpr>,
    origin: String,
}

impl Filter {
    /// A filter on `predicate`, which must evaluate to a boolean over the input schema.
    /// `origin` names the pipeline in errors-zone records.
    pub fn new(predicate: Arc<dyn PhysicalExpr>, origin: impl Into<String>) -> Self {
        Self {
            predicate,
            origin: origin.into(),
        }
    }

    fn mask(&self, batch: &RecordBatch) -> Result<BooleanArray> {
        let value = self.predicate.evaluate(batch)?;
        let array = value.into_array(batch.num_rows())?;
        array
            .as_any()
            .downcast_ref::<BooleanArray>()
            .cloned()
            .ok_or_else(|| {
                EngineError::Internal(format!(
                    "filter predicate {} returned {} instead of a boolean",
                    self.predicate,
                    array.data_type()
                ))
            })
    }
}

impl Operator for Filter {
    fn name(&self) -> &str {
        "filter"
    }

    fn snapshot(&mut self) -> Result<Option<OperatorState>> {
        Ok(None) // stateless
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<()> {
        // Rows the predicate fails on go to the errors zone.
        if let Some((batch, mask)) = evaluate_or_reject(batch, &self.origin, out, |b| self.mask(b))?
        {
            out.emit(filter_record_batch(&batch, &mask)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::util::pretty::pretty_format_batches;
    use datafusion::logical_expr::Operator as BinOp;
    use datafusion::physical_expr::expressions::{BinaryExpr, CastExpr, col, lit};

    use super::*;
    use crate::message::Message;

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("s", DataType::Utf8, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3, 4])),
                Arc::new(StringArray::from(vec![
                    Some("10"),
                    None,
                    Some("x"),
                    Some("40"),
                ])),
            ],
        )
        .unwrap()
    }

    fn data(out: &mut Collector) -> String {
        let batches: Vec<_> = out
            .take_messages()
            .into_iter()
            .filter_map(|m| match m {
                Message::Data(b) => Some(b),
                _ => None,
            })
            .collect();
        pretty_format_batches(&batches).unwrap().to_string()
    }

    #[test]
    fn keeps_true_rows_and_drops_false_and_null() {
        let b = batch();
        let pred = Arc::new(BinaryExpr::new(
            col("id", &b.schema()).unwrap(),
            BinOp::Gt,
            lit(1i64),
        ));
        let mut f = Filter::new(pred, "t");
        let mut out = Collector::default();
        f.process_batch(b, &mut out).unwrap();
        assert_eq!(
            data(&mut out),
            "+----+----+\n| id | s  |\n+----+----+\n| 2  |    |\n| 3  | x  |\n| 4  | 40 |\n+----+----+"
        );
    }

    #[test]
    fn rows_that_fail_to_evaluate_are_rejected_not_fatal() {
        let b = batch();
        // CAST(s AS BIGINT) > 5 fails on 'x' only.
        let cast = Arc::new(CastExpr::new(
            col("s", &b.schema()).unwrap(),
            DataType::Int64,
            None,
        ));
        let pred = Arc::new(BinaryExpr::new(cast, BinOp::Gt, lit(5i64)));
        let mut f = Filter::new(pred, "stream t");
        let mut out = Collector::default();
        f.process_batch(b, &mut out).unwrap();
        assert_eq!(
            data(&mut out),
            "+----+----+\n| id | s  |\n+----+----+\n| 1  | 10 |\n| 4  | 40 |\n+----+----+"
        );
        let bad = out.take_rejected();
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].payload, r#"{"id":3,"s":"x"}"#);
        assert_eq!(bad[0].origin, "stream t");
        assert!(bad[0].reason.contains("Cannot cast"), "{}", bad[0].reason);
    }
}
