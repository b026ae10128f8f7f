//! The runtime statements are planned and ad-hoc queries run on, apart from the streams.
//!
//! Two reasons to keep them apart:
//! - **Starvation.** A heavy ad-hoc query keeps its worker threads busy; on the runtime that
//!   runs the streams, HTTP ingest and checkpoints, it would hold them up. Here, queries
//!   compete with each other only (the operating system shares the cores between the two
//!   runtimes' threads).
//! - **Stack depth.** Planning and evaluating an expression recurse as deep as it nests.
//!   [`sluice_sql::limits`] bounds that nesting before planning; these threads have stacks
//!   sized for the bound (measured: planning `1 + 1 + …` takes about 8 KiB of stack per
//!   term in a debug build, a third of that in release, so the 5 000 terms the bound allows
//!   need ≈ 40 MiB). Thread stacks are reserved address space, committed only as used.
//!
//! A query's rows reach its client through a small channel: the task that pulls them runs
//! here, and when the client goes away (the channel's receiver is dropped) the task stops
//! and the query is cancelled at once.

use std::future::Future;
use std::sync::OnceLock;

use datafusion::physical_plan::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use tokio::runtime::Runtime;

use crate::error::{Result, ServerError};

/// The stack of each of its threads.
pub const QUERY_THREAD_STACK: usize = 256 << 20;

/// Batches a query may have ready ahead of its client.
const AHEAD: usize = 2;

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .max_blocking_threads(16)
            .thread_name("sluice-query")
            .thread_stack_size(QUERY_THREAD_STACK)
            .enable_all()
            .build()
            .expect("the query runtime starts (it only needs threads)")
    })
}

/// Whether queries use the dedicated runtime (the default). Off, they run on the runtime of
/// the caller — the streams' — as they did before it existed; only the benchmark turns it
/// off, to measure what the dedicated runtime is worth in one run.
static DEDICATED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the dedicated runtime off or on (see `DEDICATED`); for benchmarks.
pub fn set_dedicated(on: bool) {
    DEDICATED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Where query work is spawned.
fn handle() -> tokio::runtime::Handle {
    if DEDICATED.load(std::sync::atomic::Ordering::Relaxed) {
        runtime().handle().clone()
    } else {
        tokio::runtime::Handle::current()
    }
}

/// Runs `work` on the query runtime and waits for its result.
pub async fn run<F, T>(work: F) -> Result<T>
where
    F: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    match handle().spawn(work).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => Err(ServerError::Internal(format!(
            "a query task panicked: {}",
            panic_message(e.into_panic())
        ))),
        Err(e) => Err(ServerError::Internal(format!("a query task ended: {e}"))),
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Pulls `rows` on the query runtime; the returned stream hands them on. Dropping it stops
/// the query.
pub fn forward(mut rows: SendableRecordBatchStream) -> SendableRecordBatchStream {
    let schema = rows.schema();
    let (tx, mut rx) = tokio::sync::mpsc::channel(AHEAD);
    handle().spawn(async move {
        loop {
            let next = tokio::select! {
                // The client went away: dropping `rows` cancels the query.
                _ = tx.closed() => return,
                next = rows.next() => next,
            };
            let Some(next) = next else { return };
            let failed = next.is_err();
            if tx.send(next).await.is_err() || failed {
                return;
            }
        }
    });
    Box::pin(RecordBatchStreamAdapter::new(
        schema,
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx)),
    ))
}

/// Plans `CREATE STREAM` on the query runtime (its expressions nest as deep as an ad-hoc
/// query's).
pub async fn plan_stream(
    create: &sluice_sql::parser::CreateStream,
    relations: std::collections::BTreeMap<String, sluice_sql::Relation>,
) -> Result<sluice_sql::planner::StreamPlan> {
    let create = create.clone();
    run(async move { Ok(sluice_sql::plan_stream(&create, &relations).await?) }).await
}

/// The memory ad-hoc queries may hold together, set once by [`set_memory_limit`] before the
/// first query (default: a quarter of the machine's memory).
static MEMORY_LIMIT: OnceLock<usize> = OnceLock::new();

/// Sets the memory ad-hoc queries may hold together (`--query-memory`); only the first call
/// counts.
pub fn set_memory_limit(bytes: usize) {
    let _ = MEMORY_LIMIT.set(bytes);
}

/// The pool every ad-hoc query's operators reserve memory from: a query that needs more than
/// is left fails alone ("Resources exhausted"), or spills where its operators can, instead of
/// the process running out of memory. Shared by all queries, like the runtime.
pub fn memory_pool() -> std::sync::Arc<dyn datafusion::execution::memory_pool::MemoryPool> {
    use datafusion::execution::memory_pool::{FairSpillPool, TrackConsumersPool};
    static POOL: OnceLock<std::sync::Arc<dyn datafusion::execution::memory_pool::MemoryPool>> =
        OnceLock::new();
    std::sync::Arc::clone(POOL.get_or_init(|| {
        let limit = *MEMORY_LIMIT.get_or_init(|| machine_memory() / 4);
        std::sync::Arc::new(TrackConsumersPool::new(
            FairSpillPool::new(limit),
            std::num::NonZeroUsize::new(3).expect("3 is not zero"),
        ))
    }))
}

/// The machine's memory (Linux: `MemTotal` of /proc/meminfo); 8 GiB when unknown.
fn machine_memory() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(8 << 30)
}
