//! Errors of the connectors.

use sluice_engine::EngineError;

/// Errors raised by connectors.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// A user error in a `WITH (…)` option or a declared schema. The message names the thing.
    #[error("{0}")]
    InvalidConfig(String),
    /// The lake location cannot be used.
    #[error("lake `{location}`: {reason}")]
    InvalidLake {
        /// The location given.
        location: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The object store failed; a retry may help.
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    /// Writing Parquet failed.
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// An Arrow kernel failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// The schema registry failed to answer (after retries) or answered nonsense.
    #[error("schema registry {url}: {reason}")]
    SchemaRegistry {
        /// The request's URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The Glue Data Catalog failed or refused (the message says what was being done); a
    /// retry may help.
    #[error("Glue: {0}")]
    Glue(String),
    /// A runtime error.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<ConnectorError> for EngineError {
    fn from(e: ConnectorError) -> Self {
        match e {
            ConnectorError::Engine(e) => e,
            ConnectorError::InvalidConfig(m) => EngineError::InvalidOption(m),
            other => EngineError::external("connector", other),
        }
    }
}

/// Result type of this crate.
pub type Result<T, E = ConnectorError> = std::result::Result<T, E>;

impl From<ConnectorError> for sluice_engine::push::IngestError {
    fn from(e: ConnectorError) -> Self {
        Self::Storage(e.into())
    }
}
