//! [`AwsOptions`]: how connectors reach AWS services (or compatible servers).
//!
//! Credentials, region and endpoint come from the standard AWS environment (variables,
//! profile, instance role); a connector's `region` and `endpoint` options override the last
//! two. S3 goes through `object_store` with path-style requests, so S3-compatible servers
//! work too.

use object_store::aws::{AmazonS3, AmazonS3Builder};
use sluice_engine::WithOptions;

use crate::error::{ConnectorError, Result};

/// Region and endpoint overrides of one connector.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AwsOptions {
    /// Overrides the region of the environment.
    pub region: Option<String>,
    /// Overrides the endpoint (e.g. a local AWS-compatible server).
    pub endpoint: Option<String>,
}

impl AwsOptions {
    /// Takes `region` and `endpoint` from `opts`.
    pub fn take(opts: &mut WithOptions) -> Self {
        Self {
            region: opts.take_str("region"),
            endpoint: opts.take_str("endpoint"),
        }
    }

    /// The AWS SDK configuration: the environment's, with these overrides.
    #[cfg(feature = "aws")]
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &self.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &self.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        loader.load().await
    }

    /// A Kinesis client.
    #[cfg(feature = "aws")]
    pub async fn client(&self) -> aws_sdk_kinesis::Client {
        aws_sdk_kinesis::Client::new(&self.sdk_config().await)
    }

    /// An `object_store` client of `bucket`: the environment's settings (`AWS_ENDPOINT_URL`
    /// included), path-style requests, these overrides.
    pub fn s3_store(&self, bucket: &str) -> Result<AmazonS3> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_virtual_hosted_style_request(false);
        let endpoint = self
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        if let Some(endpoint) = endpoint {
            builder = builder
                .with_allow_http(endpoint.starts_with("http://"))
                .with_endpoint(endpoint);
        }
        if let Some(region) = &self.region {
            builder = builder.with_region(region);
        }
        builder
            .build()
            .map_err(|e| ConnectorError::InvalidConfig(format!("s3 bucket `{bucket}`: {e}")))
    }
}
