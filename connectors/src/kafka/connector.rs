//! `connector = 'kafka'`: one shared reader per source (streams created later backfill and
//! join it), and the Kafka sink.

use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use futures::future::BoxFuture;
use sluice_engine::checkpoint::SinkCheckpoint;
use sluice_engine::connector::{
    ReaderFactory, SinkConnector, SinkSpec, SourceConnector, SourceFeed, SourceSpec, Splits,
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

    /// The topic's partitions, by number.
    fn splits(&self) -> BoxFuture<'_, sluice_engine::Result<Vec<String>>> {
        let config = self.config.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let context = format!("kafka topic `{}`", config.topic);
                let mut cfg = rdkafka::config::ClientConfig::new();
                cfg.set("bootstrap.servers", &config.brokers);
                for (k, v) in &config.properties {
                    cfg.set(k, v);
                }
                let consumer: rdkafka::consumer::BaseConsumer = cfg
                    .create()
                    .map_err(|e| sluice_engine::EngineError::external(context.clone(), e))?;
                let mut partitions = super::source::topic_partitions(
                    &consumer,
                    &config.topic,
                    &Splits::All,
                    &context,
                )?;
                partitions.sort_unstable();
                Ok(partitions.iter().map(i32::to_string).collect())
            })
            .await
            .map_err(|e| {
                sluice_engine::EngineError::Internal(format!("kafka metadata task: {e}"))
            })?
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
            KafkaReader::shared(name, c.clone(), Arc::clone(&schema), raw, errors);
        let reader = reader.with_splits(splits.clone());
        // With `latest` or `committed`, a stream starts where the source is.
        let (name, config, splits) = (name.to_string(), c.clone(), splits.clone());
        let backfill = (c.start == StartPosition::Earliest).then(|| {
            ReaderFactory::new(move || {
                Box::new(
                    KafkaReader::backfill(
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
