//! `Unnest`: one output row per element of a list column — how a `HOP` or `CUMULATE` window
//! puts a row in each of its windows.
//!
//! State: none. Emits: for each input batch, one batch in which every input row is repeated
//! once per element of its list in column `column`, that column holding the element (rows
//! stay in order, a row's elements in list order). A row whose list is empty yields nothing;
//! one whose list is `NULL` yields one row with `NULL` there when `preserve_nulls` (SQL's
//! `UNNEST` as DataFusion runs it), nothing otherwise. Watermarks and barriers pass
//! unchanged.
//!
//! The row-expanding step is what lets a window hold `size / slide` slides: a 1-hour window
//! sliding every minute gives each row 60 windows in one vectorised `take` per column, where
//! a `UNION ALL` of 60 projections would have meant 60 branches merged in lockstep.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, GenericListArray, OffsetSizeTrait, UInt32Builder};
use arrow::compute::take;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::{RecordBatch, RecordBatchOptions};

use crate::checkpoint::OperatorState;
use crate::error::{EngineError, Result};
use crate::operator::{Collector, Operator};

/// Expands the list column `column` into one row per element.
#[derive(Debug)]
pub struct Unnest {
    column: usize,
    schema: SchemaRef,
    preserve_nulls: bool,
}

impl Unnest {
    /// Unnests input column `column` (a `List` or `LargeList`) into `schema`: the input's
    /// columns, with the list's element type at `column`.
    pub fn new(column: usize, schema: SchemaRef, preserve_nulls: bool) -> Self {
        Self {
            column,
            schema,
            preserve_nulls,
        }
    }

    fn expand(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let list = batch.column(self.column);
        let (rows, values) = match list.data_type() {
            DataType::List(_) => self.indices::<i32>(list)?,
            DataType::LargeList(_) => self.indices::<i64>(list)?,
            other => {
                return Err(EngineError::Internal(format!(
                    "unnest: column {} is {other}, not a list",
                    self.column
                )));
            }
        };
        let columns = batch
            .columns()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == self.column {
                    Ok(Arc::clone(&values))
                } else {
                    Ok(take(c.as_ref(), &rows, None)?)
                }
            })
            .collect::<Result<Vec<ArrayRef>>>()?;
        let options = RecordBatchOptions::new().with_row_count(Some(rows.len()));
        Ok(RecordBatch::try_new_with_options(
            Arc::clone(&self.schema),
            columns,
            &options,
        )?)
    }

    /// For the list column: the input row of each output row, and the output column.
    fn indices<O: OffsetSizeTrait>(
        &self,
        list: &ArrayRef,
    ) -> Result<(arrow::array::UInt32Array, ArrayRef)> {
        let list = list
            .as_any()
            .downcast_ref::<GenericListArray<O>>()
            .ok_or_else(|| EngineError::Internal("unnest: not a list array".into()))?;
        let offsets = list.value_offsets();
        let (first, last) = (offsets[0].as_usize(), offsets[list.len()].as_usize());
        let null_rows = if self.preserve_nulls {
            list.null_count()
        } else {
            0
        };
        let mut rows: Vec<u32> = Vec::with_capacity(last - first + null_rows);
        if null_rows == 0 {
            // The common case (a window list is never NULL for a row with a time): the
            // elements are the list's values in order, one slice, and only the other
            // columns are gathered. (A NULL list's own elements are empty by Arrow's rules
            // or skipped with it.)
            let mut taken = Vec::with_capacity(last - first);
            for r in 0..list.len() {
                if list.is_null(r) {
                    continue;
                }
                let (a, b) = (offsets[r].as_usize(), offsets[r + 1].as_usize());
                rows.extend(std::iter::repeat_n(r as u32, b - a));
                taken.extend(a as u32..b as u32);
            }
            let values = if taken.len() == last - first {
                list.values().slice(first, last - first)
            } else {
                take(
                    list.values().as_ref(),
                    &arrow::array::UInt32Array::from(taken),
                    None,
                )?
            };
            return Ok((rows.into(), values));
        }
        let mut elements = UInt32Builder::with_capacity(last - first + null_rows);
        for r in 0..list.len() {
            if list.is_null(r) {
                rows.push(r as u32);
                elements.append_null();
                continue;
            }
            for e in offsets[r].as_usize()..offsets[r + 1].as_usize() {
                rows.push(r as u32);
                elements.append_value(e as u32);
            }
        }
        let values = take(list.values().as_ref(), &elements.finish(), None)?;
        Ok((rows.into(), values))
    }
}

impl Operator for Unnest {
    fn name(&self) -> &str {
        "unnest"
    }

    fn snapshot(&mut self) -> Result<Option<OperatorState>> {
        Ok(None) // stateless
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<()> {
        // Nothing here evaluates per row, so nothing can fail for one row only.
        let expanded = self.expand(&batch)?;
        if expanded.num_rows() > 0 {
            out.emit(expanded);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, ListArray, StringArray};
    use arrow::datatypes::{Field, Schema};

    use super::*;
    use crate::message::Message;

    fn input() -> RecordBatch {
        let list = ListArray::from_iter_primitive::<arrow::datatypes::Int64Type, _, _>(vec![
            Some(vec![Some(1), Some(2), Some(3)]),
            None,
            Some(vec![]),
            Some(vec![Some(9)]),
        ]);
        let schema = Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("l", list.data_type().clone(), true),
        ]);
        RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(StringArray::from(vec!["a", "b", "c", "d"])),
                Arc::new(list),
            ],
        )
        .unwrap()
    }

    fn run(preserve_nulls: bool) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("l", DataType::Int64, true),
        ]));
        let mut op = Unnest::new(1, schema, preserve_nulls);
        let mut out = Collector::default();
        op.process_batch(input(), &mut out).unwrap();
        match out.take_messages().pop() {
            Some(Message::Data(b)) => b,
            other => panic!("expected rows, got {other:?}"),
        }
    }

    #[test]
    fn each_element_becomes_a_row_in_order() {
        let b = run(false);
        let ids = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
        let v = b.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(
            ids.iter().flatten().collect::<Vec<_>>(),
            vec!["a", "a", "a", "d"]
        );
        assert_eq!(
            v.iter().collect::<Vec<_>>(),
            vec![Some(1), Some(2), Some(3), Some(9)]
        );
    }

    #[test]
    fn a_null_list_keeps_its_row_when_nulls_are_preserved() {
        let b = run(true);
        let ids = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
        let v = b.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(
            ids.iter().flatten().collect::<Vec<_>>(),
            vec!["a", "a", "a", "b", "d"]
        );
        assert_eq!(
            v.iter().collect::<Vec<_>>(),
            vec![Some(1), Some(2), Some(3), None, Some(9)]
        );
    }
}
