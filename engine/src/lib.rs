//! The Sluice runtime: operators over Arrow `RecordBatch`es, connected by bounded channels.
//!
//! This crate knows no connector and no SQL. It defines
//! - the [`Message`] model that flows between tasks (`Data | Watermark | Barrier | End`),
//! - the [`Operator`] trait for synchronous, batch-at-a-time transformations and the
//!   [`OperatorChain`] that runs several of them in one task,
//! - the [`FanOut`] hub through which a source or stream hands its output to every reader,
//! - the [`SourceReader`], [`push::PushSource`] and [`Sink`] traits that connectors
//!   implement, and the [`connector`] factories and registry through which the server
//!   configures and opens them without naming any,
//! - [`BadRecord`]s (rows that must go to the errors zone) and per-pipeline [`Metrics`],
//! - small shared helpers: [`WithOptions`] for `WITH (…)` maps, [`EventTime`] arithmetic.
//!
//! ```text
//!  SourceReader ──► FanOut ──► [OperatorChain task] ──► FanOut ──► Sink task (lake)
//!                     │                                    └─────► other streams
//!                     └──► other streams
//! ```

pub mod checkpoint;
pub mod connector;
pub mod error;
pub mod fanout;
pub mod message;
pub mod metrics;
pub mod operator;
pub mod operators;
pub mod options;
pub mod pipeline;
pub mod push;
pub mod retry;
pub mod router;
pub mod sink;
pub mod source;
pub mod time;

pub use error::{EngineError, Result};
pub use fanout::{FanOut, Subscription};
pub use message::{BadRecord, Barrier, Message};
pub use metrics::{Metrics, MetricsSnapshot};
pub use operator::{Collector, Operator, OperatorChain, OperatorCounts};
pub use options::WithOptions;
pub use router::HashRouter;
pub use sink::Sink;
pub use source::{SourceContext, SourceReader};
pub use time::EventTime;

/// Default capacity (in messages) of the bounded channels between tasks.
///
/// With batches of a few thousand rows this keeps at most a few hundred thousand rows in
/// flight per edge; a full channel blocks the sender, which is how backpressure reaches the
/// sources.
pub const DEFAULT_CHANNEL_CAPACITY: usize = 16;
