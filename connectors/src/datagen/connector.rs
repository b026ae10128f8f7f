//! `connector = 'datagen'`: every stream generates the rows itself, from the first.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use sluice_engine::connector::{ReaderFactory, SourceConnector, SourceFeed, SourceSpec, Splits};
use sluice_engine::{SourceContext, WithOptions};

use super::{DatagenConfig, DatagenReader};

/// The `datagen` source connector.
#[derive(Debug, Default)]
pub struct DatagenConnector;

impl SourceConnector for DatagenConnector {
    fn name(&self) -> &'static str {
        "datagen"
    }

    fn configure(
        &self,
        opts: &mut WithOptions,
        schema: &SchemaRef,
    ) -> sluice_engine::Result<Arc<dyn SourceSpec>> {
        Ok(Arc::new(DatagenConfig::try_new(opts, schema)?))
    }
}

impl SourceSpec for DatagenConfig {
    fn connector(&self) -> &'static str {
        "datagen"
    }

    fn open_splits(
        &self,
        name: &str,
        schema: SchemaRef,
        _ctx: SourceContext,
        splits: &Splits,
    ) -> sluice_engine::Result<SourceFeed> {
        splits.check_one(&format!("datagen source `{name}`"))?;
        let config = self.clone();
        Ok(SourceFeed::PerStream(ReaderFactory::new(move || {
            Box::new(DatagenReader::new(config.clone(), Arc::clone(&schema)))
        })))
    }
}
