//! `Projection`: computes the output columns of each row from expressions over the input.
//!
//! State: none. Emits: one output batch per input batch, same row count (minus rows whose
//! expressions fail, which go to the errors zone). Watermarks and barriers pass unchanged.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::{RecordBatch, RecordBatchOptions};
use datafusion::physical_expr::PhysicalExpr;

use super::evaluate_or_reject;
use crate::checkpoint::OperatorState;
use crate::error::Result;
use crate::operator::{Collector, Operator};

/// Evaluates one expression per output column.
#[derive(Debug)]
pub struct Projection {
    exprs: Vec<Arc<dyn PhysicalExpr>>,
    schema: SchemaRef,
    origin: String,
}

impl Projection {
    /// A projection producing `schema` (one field per expression, in order).
    pub fn new(
        exprs: Vec<Arc<dyn PhysicalExpr>>,
        schema: SchemaRef,
        origin: impl Into<String>,
    ) -> Self {
        Self {
            exprs,
            schema,
            origin: origin.into(),
        }
    }

    fn project(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let n = batch.num_rows();
        let columns = self
            .exprs
            .iter()
            .map(|e| e.evaluate(batch).and_then(|v| v.into_array(n)))
            .collect::<datafusion::error::Result<Vec<_>>>()?;
        let options = RecordBatchOptions::new().with_row_count(Some(n));
        Ok(RecordBatch::try_new_with_options(
            Arc::clone(&self.schema),
            columns,
            &options,
        )?)
    }
}

impl Operator for Projection {
    fn name(&self) -> &str {
        "projection"
    }

    fn snapshot(&mut self) -> Result<Option<OperatorState>> {
        Ok(None) // stateless
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<()> {
        // Rows the expressions fail on go to the errors zone.
        if let Some((_, projected)) =
            evaluate_or_reject(batch, &self.origin, out, |b| self.project(b))?
        {
            out.emit(projected);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::StringArray;
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_expr::expressions::{CastExpr, col};

    use super::*;
    use crate::message::Message;

    #[test]
    fn casts_that_fail_reject_only_their_row() {
        let input = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8, true)]));
        let b = RecordBatch::try_new(
            Arc::clone(&input),
            vec![Arc::new(StringArray::from(vec!["1", "two", "3"]))],
        )
        .unwrap();
        let out_schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, true)]));
        let cast = Arc::new(CastExpr::new(
            col("s", &input).unwrap(),
            DataType::Int64,
            None,
        ));
        let mut p = Projection::new(vec![cast], out_schema, "stream p");
        let mut out = Collector::default();
        p.process_batch(b, &mut out).unwrap();
        let msgs = out.take_messages();
        let Message::Data(got) = &msgs[0] else {
            panic!("expected data, got {msgs:?}")
        };
        assert_eq!(got.num_rows(), 2);
        let bad = out.take_rejected();
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].payload, r#"{"s":"two"}"#);
    }
}
