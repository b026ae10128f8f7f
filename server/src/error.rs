//! Errors of the server, each with its Postgres SQLSTATE.

use sluice_connectors::ConnectorError;
use sluice_sql::SqlError;

/// Errors a client can get back from a statement.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Parsing, validation or planning failed.
    #[error(transparent)]
    Sql(#[from] SqlError),
    /// A query failed while running. (Shown without DataFusion's error-kind prefix.)
    #[error("{}", .0.find_root().message())]
    Query(#[from] datafusion::error::DataFusionError),
    /// The lake could not be read or written; retrying may help.
    #[error("lake: {0}")]
    Lake(#[from] ConnectorError),
    /// A bug in Sluice.
    #[error("internal error (this is a bug in Sluice): {0}")]
    Internal(String),
}

impl ServerError {
    /// The Postgres SQLSTATE for this error.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ServerError::Sql(e) => e.sqlstate(),
            ServerError::Query(e) => sluice_sql::error::datafusion_sqlstate(e),
            ServerError::Lake(_) => "58030",
            ServerError::Internal(_) => "XX000",
        }
    }

    /// The 1-based position in the statement text the error points at, where known.
    pub fn position(&self) -> Option<usize> {
        match self {
            ServerError::Sql(e) => e.position(),
            _ => None,
        }
    }
}

impl From<sluice_engine::EngineError> for ServerError {
    fn from(e: sluice_engine::EngineError) -> Self {
        ServerError::Sql(e.into())
    }
}

/// Result type of the server.
pub type Result<T, E = ServerError> = std::result::Result<T, E>;
