//! The one list of connectors: each is a folder implementing the engine's connector traits
//! ([`sluice_engine::connector`]) and one line here. Heavy ones are behind cargo features
//! (`kafka`: librdkafka; `aws`: the AWS SDK), on by default.

use sluice_engine::connector::ConnectorRegistry;

use crate::lake::Lake;

/// Every connector this build provides; those that archive or keep progress use `lake`.
pub fn registry(lake: &Lake) -> ConnectorRegistry {
    let registry = ConnectorRegistry::default()
        .with_source(crate::datagen::DatagenConnector)
        .with_source(crate::http::HttpConnector { lake: lake.clone() });
    #[cfg(feature = "kafka")]
    let registry = {
        let kafka = crate::kafka::KafkaConnector { lake: lake.clone() };
        registry.with_source(kafka.clone()).with_sink(kafka)
    };
    #[cfg(feature = "aws")]
    let registry = {
        let kinesis = crate::kinesis::KinesisConnector { lake: lake.clone() };
        registry
            .with_source(kinesis.clone())
            .with_sink(kinesis)
            .with_source(crate::s3::S3Connector { lake: lake.clone() })
    };
    registry
}
