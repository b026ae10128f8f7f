//! Errors of the SQL front end, each with its Postgres SQLSTATE.

use datafusion::error::DataFusionError;

/// Errors raised while parsing, validating or planning SQL. All are the user's to fix except
/// [`SqlError::Internal`].
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The text is not valid SQL.
    #[error("{message}")]
    Syntax {
        /// What the parser expected and found.
        message: String,
        /// 1-based character position in the statement text, where known.
        position: Option<usize>,
    },
    /// A relation that does not exist.
    #[error("{0}")]
    UndefinedObject(String),
    /// A relation that already exists.
    #[error("{0}")]
    DuplicateObject(String),
    /// A type name that is not known.
    #[error("{0}")]
    UndefinedType(String),
    /// A `WITH (…)` option is unknown or invalid.
    #[error("{0}")]
    InvalidOption(String),
    /// Valid SQL that streaming cannot run (yet).
    #[error("{0}")]
    NotSupported(String),
    /// Other objects depend on the one being dropped.
    #[error("{0}")]
    DependentObjects(String),
    /// The statement is invalid for another reason (wrong column, wrong type…).
    #[error("{0}")]
    Invalid(String),
    /// A new object's name breaks the naming rule (see [`crate::limits::check_name`]).
    #[error("{0}")]
    InvalidName(String),
    /// The statement nests too deep to plan safely (see [`crate::limits`]).
    #[error("{0}")]
    TooComplex(String),
    /// DataFusion rejected the query. (Shown without DataFusion's error-kind prefix.)
    #[error("{}", .0.find_root().message())]
    DataFusion(#[from] DataFusionError),
    /// A bug in Sluice.
    #[error("internal error (this is a bug in Sluice): {0}")]
    Internal(String),
}

impl SqlError {
    /// The Postgres SQLSTATE for this error.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            SqlError::Syntax { .. } => "42601",
            SqlError::UndefinedObject(_) => "42P01",
            SqlError::DuplicateObject(_) => "42P07",
            SqlError::UndefinedType(_) => "42704",
            SqlError::InvalidOption(_) => "22023",
            SqlError::NotSupported(_) => "0A000",
            SqlError::DependentObjects(_) => "2BP01",
            SqlError::Invalid(_) => "42000",
            // Postgres's "stack depth limit exceeded" / "statement too complex".
            SqlError::TooComplex(_) => "54001",
            SqlError::InvalidName(_) => "42602",
            SqlError::DataFusion(e) => datafusion_sqlstate(e),
            SqlError::Internal(_) => "XX000",
        }
    }

    /// The 1-based position in the statement the error points at, where known.
    pub fn position(&self) -> Option<usize> {
        match self {
            SqlError::Syntax { position, .. } => *position,
            _ => None,
        }
    }
}

/// The SQLSTATE for an error from DataFusion, by kind.
pub fn datafusion_sqlstate(e: &DataFusionError) -> &'static str {
    use datafusion::common::SchemaError;
    match e.find_root() {
        DataFusionError::SQL(..) => "42601",
        DataFusionError::NotImplemented(_) => "0A000",
        DataFusionError::SchemaError(s, _) => match s.as_ref() {
            SchemaError::FieldNotFound { .. } => "42703",
            SchemaError::AmbiguousReference { .. } => "42702",
            SchemaError::DuplicateQualifiedField { .. }
            | SchemaError::DuplicateUnqualifiedField { .. } => "42701",
        },
        DataFusionError::Plan(m) if m.contains("not found") && m.contains("table") => "42P01",
        DataFusionError::Plan(m) if m.contains("Invalid function") => "42883",
        DataFusionError::Plan(_) => "42000",
        // A value that does not read as the type asked for: `CAST('x' AS BIGINT)`, a
        // parameter bound as text (Postgres: invalid_text_representation).
        DataFusionError::ArrowError(e, _)
            if matches!(
                e.as_ref(),
                arrow::error::ArrowError::CastError(_) | arrow::error::ArrowError::ParseError(_)
            ) =>
        {
            "22P02"
        }
        DataFusionError::ArrowError(..) => "22000",
        DataFusionError::Execution(_) => "22000",
        DataFusionError::ResourcesExhausted(_) => "53200", // out_of_memory
        DataFusionError::Internal(_) => "XX000",
        _ => "XX000",
    }
}

impl SqlError {
    /// The engine's error for this one (building a planned operator fails with these).
    pub fn into_engine(self) -> sluice_engine::EngineError {
        match self {
            SqlError::InvalidOption(m) => sluice_engine::EngineError::InvalidOption(m),
            SqlError::DataFusion(e) => sluice_engine::EngineError::Evaluation(e),
            other => sluice_engine::EngineError::Internal(other.to_string()),
        }
    }
}

impl From<sluice_engine::EngineError> for SqlError {
    fn from(e: sluice_engine::EngineError) -> Self {
        match e {
            sluice_engine::EngineError::InvalidOption(m) => SqlError::InvalidOption(m),
            sluice_engine::EngineError::Evaluation(e) => SqlError::DataFusion(e),
            other => SqlError::Internal(other.to_string()),
        }
    }
}

/// Result type of this crate.
pub type Result<T, E = SqlError> = std::result::Result<T, E>;
