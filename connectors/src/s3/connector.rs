//! `connector = 's3'`: the landing zone, read by one reader that publishes every object once.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use sluice_engine::connector::{SourceConnector, SourceFeed, SourceSpec, Splits};
use sluice_engine::{SourceContext, WithOptions};

use super::{LandingConfig, LandingReader};
use crate::lake::Lake;

/// The `s3` source connector; its progress is kept in `lake`.
#[derive(Debug, Clone)]
pub struct S3Connector {
    /// Where the reader keeps which objects it ingested.
    pub lake: Lake,
}

/// A configured `s3` source.
#[derive(Debug)]
struct S3Source {
    config: LandingConfig,
    lake: Lake,
}

impl SourceConnector for S3Connector {
    fn name(&self) -> &'static str {
        "s3"
    }

    fn configure(
        &self,
        opts: &mut WithOptions,
        _schema: &SchemaRef,
    ) -> sluice_engine::Result<Arc<dyn SourceSpec>> {
        Ok(Arc::new(S3Source {
            config: LandingConfig::try_new(opts)?,
            lake: self.lake.clone(),
        }))
    }
}

impl SourceSpec for S3Source {
    fn connector(&self) -> &'static str {
        "s3"
    }

    fn open_splits(
        &self,
        name: &str,
        schema: SchemaRef,
        _ctx: SourceContext,
        splits: &Splits,
    ) -> sluice_engine::Result<SourceFeed> {
        splits.check_one(&format!("s3 source `{name}`"))?;
        Ok(SourceFeed::Shared {
            reader: Box::new(LandingReader::new(
                name,
                self.config.clone(),
                schema,
                self.lake.clone(),
            )),
            backfill: None,
        })
    }
}
