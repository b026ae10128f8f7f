//! The one list of connectors, and the validation of `CREATE SOURCE … WITH (…)`.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use sluice_engine::{SourceReader, WithOptions};

use crate::datagen::{DatagenConfig, DatagenReader};
use crate::error::{ConnectorError, Result};
use crate::http::HttpConfig;
use crate::kafka::{KafkaConfig, KafkaReader, StartPosition};
use crate::kinesis::{KinesisConfig, KinesisReader, KinesisStart};
use crate::lake::{Lake, RecordZone, Zone};
use crate::s3::{LandingConfig, LandingReader};

/// Source connectors this build provides.
pub const SOURCE_CONNECTORS: &[&str] = &["datagen", "http", "kafka", "kinesis", "s3"];

/// The validated configuration of a source, by connector.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    /// `connector = 'datagen'`.
    Datagen(DatagenConfig),
    /// `connector = 'http'`.
    Http(HttpConfig),
    /// `connector = 'kafka'`.
    Kafka(KafkaConfig),
    /// `connector = 'kinesis'`.
    Kinesis(KinesisConfig),
    /// `connector = 's3'`: the landing zone.
    S3(LandingConfig),
}

impl SourceConfig {
    /// The connector's name as written in `WITH (connector = …)`.
    pub fn connector(&self) -> &'static str {
        match self {
            SourceConfig::Datagen(_) => "datagen",
            SourceConfig::Http(_) => "http",
            SourceConfig::Kafka(_) => "kafka",
            SourceConfig::Kinesis(_) => "kinesis",
            SourceConfig::S3(_) => "s3",
        }
    }

    /// Whether the source's rows come from one place for every stream (pushed over HTTP, or
    /// read once by the source's own reader), rather than from a reader per stream.
    pub fn publishes_to_hub(&self) -> bool {
        !matches!(self, SourceConfig::Datagen(_))
    }

    /// A stream's reader of the source; `None` for sources that publish to their hub
    /// ([`Self::publishes_to_hub`]).
    pub fn reader(&self, schema: SchemaRef) -> Option<Box<dyn SourceReader>> {
        match self {
            SourceConfig::Datagen(c) => Some(Box::new(DatagenReader::new(c.clone(), schema))),
            _ => None,
        }
    }

    /// The receiving end of a push source (`http`), fed by the server's front door; `None`
    /// for sources that read. `ctx` is where it publishes.
    pub fn push_source(
        &self,
        name: &str,
        schema: SchemaRef,
        lake: &Lake,
        ctx: sluice_engine::SourceContext,
    ) -> Option<Result<Arc<dyn sluice_engine::push::PushSource>>> {
        match self {
            SourceConfig::Http(c) => Some(
                crate::http::HttpIngest::new(name, schema, c.clone(), lake.clone(), ctx)
                    .map(|i| Arc::new(i) as Arc<dyn sluice_engine::push::PushSource>),
            ),
            _ => None,
        }
    }

    /// The source's own reader (kafka, kinesis, s3): the one reader of the source, which
    /// archives raw records, reports bad ones once for the source and publishes the rows to
    /// every stream. `lake` holds the raw and errors zones.
    pub fn archiver(&self, name: &str, schema: SchemaRef, lake: &Lake) -> Option<OwnReader> {
        let raw = |on: bool| on.then(|| RecordZone::new(lake.clone(), Zone::Raw, name));
        let errors = || RecordZone::new(lake.clone(), Zone::Errors, name);
        match self {
            SourceConfig::Kafka(c) => {
                let (reader, joinable) = KafkaReader::shared(
                    name,
                    c.clone(),
                    Arc::clone(&schema),
                    raw(c.raw_zone),
                    errors(),
                );
                // With `latest` or `committed`, a stream starts where the source is.
                let (name, config) = (name.to_string(), c.clone());
                let backfill = (c.start == StartPosition::Earliest).then(|| {
                    Backfill::new(move || {
                        Box::new(KafkaReader::backfill(
                            name.clone(),
                            config.clone(),
                            Arc::clone(&schema),
                            joinable.clone(),
                        ))
                    })
                });
                Some(OwnReader {
                    reader: Box::new(reader),
                    backfill,
                })
            }
            SourceConfig::Kinesis(c) => {
                let (reader, joinable) = KinesisReader::shared(
                    name,
                    c.clone(),
                    Arc::clone(&schema),
                    raw(c.raw_zone),
                    errors(),
                );
                // With `latest`, a stream starts where the source is.
                let (name, config) = (name.to_string(), c.clone());
                let backfill = (c.start == KinesisStart::TrimHorizon).then(|| {
                    Backfill::new(move || {
                        Box::new(KinesisReader::backfill(
                            name.clone(),
                            config.clone(),
                            Arc::clone(&schema),
                            joinable.clone(),
                        ))
                    })
                });
                Some(OwnReader {
                    reader: Box::new(reader),
                    backfill,
                })
            }
            SourceConfig::S3(c) => Some(OwnReader {
                reader: Box::new(LandingReader::new(name, c.clone(), schema, lake.clone())),
                backfill: None,
            }),
            SourceConfig::Datagen(_) | SourceConfig::Http(_) => None,
        }
    }
}

/// A source's own reader ([`SourceConfig::archiver`]).
pub struct OwnReader {
    /// The reader.
    pub reader: Box<dyn SourceReader>,
    /// How a stream that starts while the reader runs catches up with it, for sources whose
    /// streams must see the records read before they started.
    pub backfill: Option<Backfill>,
}

/// Makes the readers with which a stream that starts while its source runs reads what the
/// source's reader has read already, then joins it (see [`crate::join`]).
#[derive(Clone)]
pub struct Backfill(Arc<dyn Fn() -> Box<dyn SourceReader> + Send + Sync>);

impl Backfill {
    fn new(make: impl Fn() -> Box<dyn SourceReader> + Send + Sync + 'static) -> Self {
        Self(Arc::new(make))
    }

    /// A backfill reader for one stream (or sink).
    pub fn reader(&self) -> Box<dyn SourceReader> {
        (self.0)()
    }
}

impl std::fmt::Debug for Backfill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Backfill")
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
        "kafka" => SourceConfig::Kafka(KafkaConfig::try_new(&mut opts, schema)?),
        "kinesis" => SourceConfig::Kinesis(KinesisConfig::try_new(&mut opts, schema)?),
        "s3" => SourceConfig::S3(LandingConfig::try_new(&mut opts)?),
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

/// Sink connectors this build provides.
pub const SINK_CONNECTORS: &[&str] = &["kafka", "kinesis"];

/// The validated configuration of a sink, by connector.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkConfig {
    /// `connector = 'kafka'`.
    Kafka(crate::kafka::KafkaSinkConfig),
    /// `connector = 'kinesis'`.
    Kinesis(crate::kinesis::KinesisSinkConfig),
}

impl SinkConfig {
    /// The connector's name as written in `WITH (connector = …)`.
    pub fn connector(&self) -> &'static str {
        match self {
            SinkConfig::Kafka(_) => "kafka",
            SinkConfig::Kinesis(_) => "kinesis",
        }
    }

    /// Whether the sink can deliver exactly once (with a [`sluice_engine::checkpoint::SinkCheckpoint`]),
    /// and whether it was asked to: `Some(true)` asked, `Some(false)` declined, `None` left
    /// to the default (exactly once when its input checkpoints).
    pub fn exactly_once(&self) -> (bool, Option<bool>) {
        match self {
            SinkConfig::Kafka(c) => (
                true,
                c.delivery.map(|d| d == crate::kafka::Delivery::ExactlyOnce),
            ),
            SinkConfig::Kinesis(_) => (false, None),
        }
    }

    /// The running sink, named `name`; exactly once when given `checkpoint` (see
    /// [`Self::exactly_once`]).
    pub fn sink(
        &self,
        name: &str,
        checkpoint: Option<sluice_engine::checkpoint::SinkCheckpoint>,
    ) -> Result<Box<dyn sluice_engine::Sink>> {
        match self {
            SinkConfig::Kafka(c) => Ok(Box::new(match checkpoint {
                Some(ck) => crate::kafka::KafkaSink::exactly_once(name, c.clone(), ck)?,
                None => crate::kafka::KafkaSink::try_new(name, c.clone())?,
            })),
            SinkConfig::Kinesis(c) => Ok(Box::new(crate::kinesis::KinesisSink::try_new(
                name,
                c.clone(),
            )?)),
        }
    }
}

/// Validates the options of a sink of rows of `schema`: takes `connector` and that
/// connector's options from `opts`, then fails on any option left over.
pub fn sink_config(mut opts: WithOptions, schema: &arrow::datatypes::Schema) -> Result<SinkConfig> {
    let owner = opts.owner().to_string();
    let Some(connector) = opts.take_str("connector") else {
        return Err(ConnectorError::InvalidConfig(format!(
            "{owner}: option `connector` is required (one of: {})",
            SINK_CONNECTORS.join(", ")
        )));
    };
    let config = match connector.to_ascii_lowercase().as_str() {
        "kafka" => SinkConfig::Kafka(crate::kafka::KafkaSinkConfig::try_new(&mut opts, schema)?),
        "kinesis" => SinkConfig::Kinesis(crate::kinesis::KinesisSinkConfig::try_new(
            &mut opts, schema,
        )?),
        other => {
            return Err(ConnectorError::InvalidConfig(format!(
                "{owner}: sink connector `{other}` is not known (available: {})",
                SINK_CONNECTORS.join(", ")
            )));
        }
    };
    opts.finish()?;
    Ok(config)
}
