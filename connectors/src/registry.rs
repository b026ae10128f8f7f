//! The one list of connectors, and the validation of `CREATE SOURCE … WITH (…)`.

use arrow::datatypes::SchemaRef;
use sluice_engine::{SourceReader, WithOptions};

use crate::datagen::{DatagenConfig, DatagenReader};
use crate::error::{ConnectorError, Result};
use crate::http::HttpConfig;

/// Source connectors this build provides.
pub const SOURCE_CONNECTORS: &[&str] = &["datagen", "http"];

/// Connectors that are planned but not in this build yet (named in errors so users know).
const PLANNED_CONNECTORS: &[&str] = &["kafka", "kinesis", "s3"];

/// The validated configuration of a source, by connector.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    /// `connector = 'datagen'`.
    Datagen(DatagenConfig),
    /// `connector = 'http'`.
    Http(HttpConfig),
}

impl SourceConfig {
    /// The connector's name as written in `WITH (connector = …)`.
    pub fn connector(&self) -> &'static str {
        match self {
            SourceConfig::Datagen(_) => "datagen",
            SourceConfig::Http(_) => "http",
        }
    }

    /// The reader task of a pull-based source; `None` for push-based ones (`http`).
    pub fn reader(&self, schema: SchemaRef) -> Option<Box<dyn SourceReader>> {
        match self {
            SourceConfig::Datagen(c) => Some(Box::new(DatagenReader::new(c.clone(), schema))),
            SourceConfig::Http(_) => None,
        }
    }
}

/// Validates the options of a source with `schema`: takes `connector` and that connector's
/// options from `opts`, then fails on any option left over.
pub fn source_config(mut opts: WithOptions, schema: &SchemaRef) -> Result<SourceConfig> {
    let owner = opts.owner().to_string();
    let Some(connector) = opts.take_str("connector") else {
        return Err(ConnectorError::InvalidConfig(format!(
            "{owner}: option `connector` is required (one of: {})",
            SOURCE_CONNECTORS.join(", ")
        )));
    };
    let config = match connector.to_ascii_lowercase().as_str() {
        "datagen" => SourceConfig::Datagen(DatagenConfig::try_new(&mut opts, schema)?),
        "http" => SourceConfig::Http(HttpConfig::try_new(&mut opts)?),
        other if PLANNED_CONNECTORS.contains(&other) => {
            return Err(ConnectorError::InvalidConfig(format!(
                "{owner}: connector `{other}` is not available in this build yet (available: {})",
                SOURCE_CONNECTORS.join(", ")
            )));
        }
        other => {
            return Err(ConnectorError::InvalidConfig(format!(
                "{owner}: connector `{other}` is not known (available: {})",
                SOURCE_CONNECTORS.join(", ")
            )));
        }
    };
    opts.finish()?;
    Ok(config)
}
