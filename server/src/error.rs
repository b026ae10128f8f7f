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
    /// This server is not the lake's writer (a standby, or one that lost the lease): the
    /// statement must go to the writer the message names.
    #[error("{0}")]
    Standby(String),
    /// Something outside Sluice failed or refused (a port in use, an unreachable service,
    /// a denied bucket): the message says what; not a bug.
    #[error("{0}")]
    External(String),
    /// The statement was stopped: its `statement_timeout` passed or the client cancelled it.
    #[error("{0}")]
    Canceled(String),
    /// The user lacks a privilege the statement needs (SQLSTATE 42501).
    #[error("{0}")]
    PermissionDenied(String),
    /// A role, user, policy, token or secret that does not exist (42704).
    #[error("{0}")]
    UndefinedRole(String),
    /// A role, policy, token or secret of that name exists already (42710).
    #[error("{0}")]
    DuplicateRole(String),
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
            // Postgres's answer to a write on a hot standby.
            ServerError::Standby(_) => "25006",
            ServerError::External(_) => "58000",
            ServerError::Canceled(_) => "57014",
            ServerError::PermissionDenied(_) => "42501",
            ServerError::UndefinedRole(_) => "42704",
            ServerError::DuplicateRole(_) => "42710",
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
