//! `connector = 'kinesis'`: one shared reader per source (streams created later backfill and
//! join it), and the Kinesis sink.

use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use futures::future::BoxFuture;
use sluice_engine::checkpoint::SinkCheckpoint;
use sluice_engine::connector::{
    ReaderFactory, SinkConnector, SinkSpec, SourceConnector, SourceFeed, SourceSpec, Splits,
};
use sluice_engine::{Sink, SourceContext, WithOptions};

use super::{KinesisConfig, KinesisReader, KinesisSink, KinesisSinkConfig, KinesisStart};
use crate::lake::{Lake, RecordZone, Zone};

/// The `kinesis` source and sink connector; sources archive to `lake`'s raw and errors zones.
#[derive(Debug, Clone)]
pub struct KinesisConnector {
    /// Where sources archive.
    pub lake: Lake,
}

/// A configured `kinesis` source.
#[derive(Debug)]
struct KinesisSource {
    config: KinesisConfig,
    lake: Lake,
}

impl SourceConnector for KinesisConnector {
    fn name(&self) -> &'static str {
        "kinesis"
    }

    fn configure(
        &self,
        opts: &mut WithOptions,
        schema: &SchemaRef,
    ) -> sluice_engine::Result<Arc<dyn SourceSpec>> {
        Ok(Arc::new(KinesisSource {
            config: KinesisConfig::try_new(opts, schema)?,
            lake: self.lake.clone(),
        }))
    }
}

impl SourceSpec for KinesisSource {
    fn connector(&self) -> &'static str {
        "kinesis"
    }

    /// The stream's shards (open and closed), by id.
    fn splits(&self) -> BoxFuture<'_, sluice_engine::Result<Vec<String>>> {
        Box::pin(async move {
            let client = self.config.aws.client().await;
            let shards = super::source::list_shards(&client, &self.config.stream)
                .await
                .map_err(|e| {
                    sluice_engine::EngineError::external(
                        format!("kinesis stream `{}`", self.config.stream),
                        std::io::Error::other(e),
                    )
                })?;
            let mut ids: Vec<String> = shards.iter().map(|s| s.shard_id().to_string()).collect();
            ids.sort();
            Ok(ids)
        })
    }

    fn open_splits(
        &self,
        name: &str,
        schema: SchemaRef,
        _ctx: SourceContext,
        splits: &Splits,
    ) -> sluice_engine::Result<SourceFeed> {
        let c = &self.config;
        let raw = c
            .raw_zone
            .then(|| RecordZone::new(self.lake.clone(), Zone::Raw, name));
        let errors = RecordZone::new(self.lake.clone(), Zone::Errors, name);
        let (reader, joinable) =
            KinesisReader::shared(name, c.clone(), Arc::clone(&schema), raw, errors);
        let reader = reader.with_splits(splits.clone());
        // With `latest`, a stream starts where the source is.
        let (name, config, splits) = (name.to_string(), c.clone(), splits.clone());
        let backfill = (c.start == KinesisStart::TrimHorizon).then(|| {
            ReaderFactory::new(move || {
                Box::new(
                    KinesisReader::backfill(
                        name.clone(),
                        config.clone(),
                        Arc::clone(&schema),
                        joinable.clone(),
                    )
                    .with_splits(splits.clone()),
                )
            })
        });
        Ok(SourceFeed::Shared {
            reader: Box::new(reader),
            backfill,
        })
    }
}

impl SinkConnector for KinesisConnector {
    fn name(&self) -> &'static str {
        "kinesis"
    }

    fn configure(
        &self,
        opts: &mut WithOptions,
        schema: &Schema,
    ) -> sluice_engine::Result<Arc<dyn SinkSpec>> {
        Ok(Arc::new(KinesisSinkConfig::try_new(opts, schema)?))
    }
}

impl SinkSpec for KinesisSinkConfig {
    fn connector(&self) -> &'static str {
        "kinesis"
    }

    fn open(
        &self,
        name: &str,
        _checkpoint: Option<SinkCheckpoint>,
    ) -> sluice_engine::Result<Box<dyn Sink>> {
        Ok(Box::new(KinesisSink::try_new(name, self.clone())?))
    }
}
