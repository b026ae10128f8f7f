//! State bytes per live row of the `join` pipeline's interval join: the bids run through the
//! planned branches into the planned join with no watermark, so every row stays in state;
//! then [`StreamJoin::state_bytes`] over [`StreamJoin::state_rows`].
//!
//! The throughput run cannot show this: its state is freed every 20 ms of event time (a few
//! thousand live rows, lost in the process' RSS).

use arrow::record_batch::RecordBatch;
use sluice_engine::operators::StreamJoin;
use sluice_engine::{Collector, Message, Operator};
use sluice_sql::OpSpec;

/// What the measurement found.
pub struct JoinState {
    /// Rows held (both sides).
    pub rows: usize,
    /// Bytes they take in memory.
    pub bytes: usize,
    /// Arrow bytes per generated row, before the join (for scale).
    pub input_bytes_per_row: f64,
}

/// Runs `events` bids of `source_sql` (datagen) through the branches and join of
/// `stream_sql`, holding every row.
pub async fn measure(source_sql: &str, stream_sql: &str) -> anyhow::Result<JoinState> {
    let def = crate::source_of(source_sql)?;
    let plan = crate::plan_over_clicks(stream_sql, &def).await?;
    let Some(OpSpec::Join { spec, input, .. }) = plan.post.first() else {
        anyhow::bail!("the stream does not start its post-merge chain with a join")
    };
    let mut join = StreamJoin::new(spec.clone(), input, "bench")?;
    let mut branches = plan
        .branches
        .iter()
        .map(|b| {
            let ops = b
                .ops
                .iter()
                .map(|o| o.instantiate("bench"))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(sluice_engine::OperatorChain::new(ops))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (mut generated_rows, mut generated_bytes) = (0usize, 0usize);
    let mut out = Collector::default();
    crate::expect::generated(source_sql, |b: &RecordBatch| {
        generated_rows += b.num_rows();
        generated_bytes += b.get_array_memory_size();
        for chain in &mut branches {
            let mut merged = Collector::default();
            chain.process(Message::Data(b.clone()), &mut merged)?;
            for m in merged.take_messages() {
                if let Message::Data(rows) = m {
                    join.process_batch(rows, &mut out)?;
                }
            }
        }
        // Pairs are emitted and dropped: only the state is measured.
        out.take_messages();
        Ok(())
    })
    .await?;
    Ok(JoinState {
        rows: join.state_rows().iter().sum(),
        bytes: join.state_bytes(),
        input_bytes_per_row: generated_bytes as f64 / generated_rows.max(1) as f64,
    })
}
