//! [`PipelineSpec`]: a planned stream as the engine sees it — its branches' inputs, operator
//! factories, the stateful stage's key and parallelism — and the one builder that turns it
//! into a [`StreamTask`], restoring operator state written at any parallelism. The server,
//! the differential test and the benchmarks all build their tasks here; the SQL layer makes
//! the spec from its plan (`StreamPlan::pipeline`).

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use datafusion::physical_expr::PhysicalExpr;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Branch, StreamTask, stateful_stage};
use crate::checkpoint::{CheckpointHandle, OperatorState};
use crate::error::Result;
use crate::fanout::{FanOut, Subscription};
use crate::message::BadRecord;
use crate::metrics::Metrics;
use crate::operator::OperatorChain;

/// Makes a fresh copy of an operator chain (a branch's, or one subtask's stateful stage).
pub type ChainFactory = Arc<dyn Fn() -> Result<OperatorChain> + Send + Sync>;

/// One input of a stream: what it reads and the operators its rows go through.
#[derive(Clone)]
pub struct BranchSpec {
    /// The source or stream it reads.
    pub input: String,
    /// Its operators.
    pub chain: ChainFactory,
}

/// A stream's pipeline, ready to build.
#[derive(Clone)]
pub struct PipelineSpec {
    /// The stream's name.
    pub name: String,
    /// Its branches (several for `UNION ALL`).
    pub branches: Vec<BranchSpec>,
    /// The operators after the branches merge.
    pub post: ChainFactory,
    /// The key rows are routed to the `post` subtasks by (none when they cannot be).
    pub partition_keys: Vec<Arc<dyn PhysicalExpr>>,
    /// How many subtasks run `post`.
    pub parallelism: usize,
    /// The schema where the branches merge.
    pub merge_schema: SchemaRef,
    /// Index of the output's event-time column, if it has one.
    pub event_time_column: Option<usize>,
}

impl std::fmt::Debug for PipelineSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineSpec")
            .field("name", &self.name)
            .field(
                "inputs",
                &self.branches.iter().map(|b| &b.input).collect::<Vec<_>>(),
            )
            .field("parallelism", &self.parallelism)
            .finish()
    }
}

/// What a built task is connected to, besides its inputs.
#[derive(Debug)]
pub struct TaskWiring<'a> {
    /// Where its output goes.
    pub output: FanOut,
    /// Its counters.
    pub metrics: Arc<Metrics>,
    /// Where rows its operators reject go.
    pub bad_records: mpsc::Sender<Vec<BadRecord>>,
    /// Stops it.
    pub cancel: CancellationToken,
    /// One per `post` subtask when the stream checkpoints; empty otherwise.
    pub checkpoints: Vec<CheckpointHandle>,
    /// The operator states of the checkpoint it resumes from (per operator of `post`, the
    /// parts every subtask held, at whatever parallelism it ran).
    pub restored: Option<&'a [Vec<OperatorState>]>,
}

impl PipelineSpec {
    /// Whether every operator of the pipeline can snapshot its state (built once to ask).
    pub fn checkpointable(&self) -> Result<bool> {
        for b in &self.branches {
            if !(b.chain)()?.checkpointable() {
                return Ok(false);
            }
        }
        Ok((self.post)()?.checkpointable())
    }

    /// The stream's task. `input` subscribes to what a branch reads (by its input's name;
    /// once per branch) and says after how long without messages the merge stops waiting
    /// for it. Branches reading the same input run in lockstep.
    pub fn build(
        &self,
        mut input: impl FnMut(&str) -> Result<(Subscription, Option<Duration>)>,
        wiring: TaskWiring<'_>,
    ) -> Result<StreamTask> {
        let mut branches = Vec::with_capacity(self.branches.len());
        for (i, b) in self.branches.iter().enumerate() {
            let (subscription, idle_timeout) = input(&b.input)?;
            branches.push(Branch {
                input: subscription,
                chain: (b.chain)()?,
                idle_timeout,
                same_input_as: self.branches[..i]
                    .iter()
                    .position(|other| other.input == b.input),
            });
        }
        let (post, router) = stateful_stage(
            self.parallelism,
            &self.partition_keys,
            || (self.post)(),
            wiring.restored,
        )?;
        Ok(StreamTask {
            name: self.name.clone(),
            branches,
            output: wiring.output,
            output_schema: Arc::clone(&self.merge_schema),
            post,
            router,
            event_time_column: self.event_time_column,
            metrics: wiring.metrics,
            bad_records: wiring.bad_records,
            cancel: wiring.cancel,
            checkpoints: wiring.checkpoints,
        })
    }
}
