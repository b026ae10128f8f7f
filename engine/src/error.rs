//! Errors of the runtime.

use datafusion::error::DataFusionError;

/// Errors raised by the runtime.
///
/// Variants say whose fault an error is: the user's input ([`EngineError::InvalidOption`]),
/// an expression that could not be evaluated ([`EngineError::Evaluation`]), or a bug in Sluice
/// ([`EngineError::Internal`]).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A `WITH (…)` option is unknown, missing or has a bad value. The message names it.
    #[error("{0}")]
    InvalidOption(String),
    /// A DataFusion expression failed on a batch.
    #[error("evaluation failed: {0}")]
    Evaluation(#[from] DataFusionError),
    /// An Arrow kernel failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// The downstream side of a channel went away (the pipeline is shutting down).
    #[error("the downstream side of `{0}` closed")]
    Closed(String),
    /// An external system failed (I/O, object store, network). A retry may help.
    #[error("{context}: {source}")]
    External {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A checkpoint cannot be read or does not fit what restores it (written by a newer
    /// Sluice, or for a different query).
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// This process no longer holds the lake's writer lease: it must commit nothing more.
    #[error("fenced: {0}")]
    Fenced(String),
    /// A broken invariant: this is a bug in Sluice.
    #[error("internal error (this is a bug in Sluice): {0}")]
    Internal(String),
}

impl EngineError {
    /// Wraps an external error with what was being done when it happened.
    pub fn external(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::External {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// Result type of this crate.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
