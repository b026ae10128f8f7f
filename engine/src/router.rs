//! [`HashRouter`]: splits batches among the parallel subtasks of a stateful operator.
//!
//! Row `r` goes to subtask `hash(key(r)) % n`, with DataFusion's own row hashing
//! (`create_hashes`) under a fixed seed, so a key always lands on the same subtask — its rows
//! keep their order and its state lives in one place — in every run and every process.

use std::sync::Arc;

use arrow::array::{ArrayRef, UInt32Array};
use arrow::compute::take;
use arrow::record_batch::RecordBatch;
use datafusion::common::hash_utils::{RandomState, create_hashes};
use datafusion::physical_expr::PhysicalExpr;

use crate::error::Result;

/// The seed of the routing hash. Changing it moves keys between subtasks (and, once state is
/// checkpointed, between the subtasks' snapshots): never change it.
const ROUTING_SEED: u64 = 0x5111_ce00;

/// Routes rows to `n` subtasks by the hash of key expressions.
#[derive(Debug, Clone)]
pub struct HashRouter {
    keys: Vec<Arc<dyn PhysicalExpr>>,
    n: usize,
    state: RandomState,
}

impl HashRouter {
    /// A router over `keys` (expressions over the batches it will split) to `n` subtasks.
    pub fn new(keys: Vec<Arc<dyn PhysicalExpr>>, n: usize) -> Self {
        Self {
            keys,
            n: n.max(1),
            state: RandomState::with_seed(ROUTING_SEED),
        }
    }

    /// The number of subtasks.
    pub fn subtasks(&self) -> usize {
        self.n
    }

    /// The subtask of each row of `keys`, the key expressions already evaluated (as a
    /// stateful operator keeps them in its state).
    pub fn route_keys(&self, keys: &[ArrayRef], rows: usize) -> Result<Vec<usize>> {
        let mut hashes = vec![0u64; rows];
        create_hashes(keys, &self.state, &mut hashes)?;
        Ok(hashes
            .iter()
            .map(|h| (*h % self.n as u64) as usize)
            .collect())
    }

    /// Splits `batch`: element `i` holds the rows for subtask `i`, in their input order
    /// (`None` when it gets none).
    pub fn split(&self, batch: &RecordBatch) -> Result<Vec<Option<RecordBatch>>> {
        let rows = batch.num_rows();
        let keys: Vec<ArrayRef> = self
            .keys
            .iter()
            .map(|e| e.evaluate(batch).and_then(|v| v.into_array(rows)))
            .collect::<datafusion::error::Result<_>>()?;
        let mut indices: Vec<Vec<u32>> = vec![Vec::new(); self.n];
        for (i, s) in self.route_keys(&keys, rows)?.into_iter().enumerate() {
            indices[s].push(i as u32);
        }
        indices
            .into_iter()
            .map(|idx| {
                if idx.is_empty() {
                    return Ok(None);
                }
                if idx.len() == rows {
                    return Ok(Some(batch.clone()));
                }
                let idx = UInt32Array::from(idx);
                let columns = batch
                    .columns()
                    .iter()
                    .map(|c| take(c.as_ref(), &idx, None))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Some(RecordBatch::try_new(batch.schema(), columns)?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_expr::expressions::col;

    use super::*;

    #[test]
    fn a_key_always_goes_to_the_same_subtask_and_order_is_kept() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("seq", DataType::Int64, false),
        ]));
        let keys: Vec<String> = (0..1000).map(|i| format!("key{}", i % 37)).collect();
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(StringArray::from_iter_values(&keys)),
                Arc::new(Int64Array::from_iter_values(0..1000)),
            ],
        )
        .unwrap();
        let router = HashRouter::new(vec![col("k", &schema).unwrap()], 3);
        let parts = router.split(&batch).unwrap();
        let mut owner = std::collections::HashMap::new();
        let mut total = 0;
        for (i, part) in parts.iter().enumerate() {
            let part = part.as_ref().expect("37 keys reach every subtask");
            let k = part
                .column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap();
            let seq = part
                .column(1)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap();
            assert!(
                seq.values().windows(2).all(|w| w[0] < w[1]),
                "input order kept"
            );
            for key in k.iter().flatten() {
                assert_eq!(*owner.entry(key.to_string()).or_insert(i), i, "{key}");
            }
            total += part.num_rows();
        }
        assert_eq!(total, 1000);
        // The same split in another router (another process): same owners.
        let again = HashRouter::new(vec![col("k", &schema).unwrap()], 3)
            .split(&batch)
            .unwrap();
        assert_eq!(
            again
                .iter()
                .map(|p| p.as_ref().map(|b| b.num_rows()))
                .collect::<Vec<_>>(),
            parts
                .iter()
                .map(|p| p.as_ref().map(|b| b.num_rows()))
                .collect::<Vec<_>>()
        );
    }
}
