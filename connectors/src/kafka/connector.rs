//! `connector = 'kafka'`: one shared reader per source (streams created later backfill and
//! join it), and the Kafka sink.

use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use sluice_engine::checkpoint::SinkCheckpoint;
use sluice_engine::connector::{
    ReaderFactory, SinkConnector, SinkSpec, SourceConnector, SourceFeed, SourceSpec,
};
use sluice_engine::{Sink, SourceContext, WithOptions};

use super::{Delivery, KafkaConfig, KafkaReader, KafkaSink, KafkaSinkConfig, StartPosition};
use crate::lake::{Lake, RecordZone, Zone};

/// The `kafka` source and sink connector; sources archive to `lake`'s raw and errors zones.
#[derive(Debug, Clone)]
pub struct KafkaConnector {
    /// Where sources archive.
    pub lake: Lake,
}

/// A configured `kafka` source.
#[derive(Debug)]
struct KafkaSource {
    config: KafkaConfig,
    lake: Lake,
}

impl SourceConnector for KafkaConnector {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn configure(
        &self,
        opts: &mut WithOptions,
        schema: &SchemaRef,
    ) -> sluice_engine::Result<Arc<dyn SourceSpec>> {
        Ok(Arc::new(KafkaSource {
            config: KafkaConfig::try_new(opts, schema)?,
            lake: self.lake.clone(),
        }))
    }
}

impl SourceSpec for KafkaSource {
    fn connector(&self) -> &'static str {
        "kafka"
    }

    fn open(
        &self,
        name: &str,
        schema: SchemaRef,
        _ctx: SourceContext,
    ) -> sluice_engine::Result<SourceFeed> {
        let c = &self.config;
        let raw = c
            .raw_zone
            .then(|| RecordZone::new(self.lake.clone(), Zone::Raw, name));
        let errors = RecordZone::new(self.lake.clone(), Zone::Errors, name);
        let (reader, joinable) =
            KafkaReader::shared(name, c.clone(), Arc::clone(&schema), raw, errors);
        // With `latest` or `committed`, a stream starts where the source is.
        let (name, config) = (name.to_string(), c.clone());
        let backfill = (c.start == StartPosition::Earliest).then(|| {
            ReaderFactory::new(move || {
                Box::new(KafkaReader::backfill(
                    name.clone(),
                    config.clone(),
                    Arc::clone(&schema),
                    joinable.clone(),
                ))
            })
        });
        Ok(SourceFeed::Shared {
            reader: Box::new(reader),
            backfill,
        })
    }
}

impl SinkConnector for KafkaConnector {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn configure(
        &self,
        opts: &mut WithOptions,
        schema: &Schema,
    ) -> sluice_engine::Result<Arc<dyn SinkSpec>> {
        Ok(Arc::new(KafkaSinkConfig::try_new(opts, schema)?))
    }
}

impl SinkSpec for KafkaSinkConfig {
    fn connector(&self) -> &'static str {
        "kafka"
    }

    fn exactly_once(&self) -> (bool, Option<bool>) {
        (true, self.delivery.map(|d| d == Delivery::ExactlyOnce))
    }

    fn open(
        &self,
        name: &str,
        checkpoint: Option<SinkCheckpoint>,
    ) -> sluice_engine::Result<Box<dyn Sink>> {
        Ok(Box::new(match checkpoint {
            Some(ck) => KafkaSink::exactly_once(name, self.clone(), ck)?,
            None => KafkaSink::try_new(name, self.clone())?,
        }))
    }
}
