//! `connector = 'http'`: rows pushed to `POST /v1/sources/{name}/events`.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use sluice_engine::connector::{SourceConnector, SourceFeed, SourceSpec, Splits};
use sluice_engine::{SourceContext, WithOptions};

use super::{HttpConfig, HttpIngest};
use crate::lake::Lake;

/// The `http` source connector; requests are stored in `lake`'s raw zone.
#[derive(Debug, Clone)]
pub struct HttpConnector {
    /// Where request bodies are stored.
    pub lake: Lake,
}

/// A configured `http` source.
#[derive(Debug)]
struct HttpSource {
    config: HttpConfig,
    lake: Lake,
}

impl SourceConnector for HttpConnector {
    fn name(&self) -> &'static str {
        "http"
    }

    fn configure(
        &self,
        opts: &mut WithOptions,
        _schema: &SchemaRef,
    ) -> sluice_engine::Result<Arc<dyn SourceSpec>> {
        Ok(Arc::new(HttpSource {
            config: HttpConfig::try_new(opts)?,
            lake: self.lake.clone(),
        }))
    }
}

impl SourceSpec for HttpSource {
    fn connector(&self) -> &'static str {
        "http"
    }

    fn open_splits(
        &self,
        name: &str,
        schema: SchemaRef,
        ctx: SourceContext,
        splits: &Splits,
    ) -> sluice_engine::Result<SourceFeed> {
        splits.check_one(&format!("http source `{name}`"))?;
        let ingest = HttpIngest::new(name, schema, self.config.clone(), self.lake.clone(), ctx)?;
        Ok(SourceFeed::Push(Arc::new(ingest)))
    }
}
