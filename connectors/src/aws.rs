//! [`AwsOptions`]: how connectors reach AWS services (or compatible servers).
//!
//! Credentials, region and endpoint come from the standard AWS environment (variables,
//! profile, instance role); a connector's `region` and `endpoint` options override the last
//! two, and `access_key_id` with `secret_access_key` (and `session_token`) the credentials —
//! give the secret ones as `SECRET name` so that they are sealed in the catalog. S3 goes
//! through `object_store` with path-style requests, so S3-compatible servers work too.

use object_store::aws::{AmazonS3, AmazonS3Builder};
use sluice_engine::WithOptions;

use crate::error::{ConnectorError, Result};

/// Region, endpoint and credential overrides of one connector.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct AwsOptions {
    /// Overrides the region of the environment.
    pub region: Option<String>,
    /// Overrides the endpoint (e.g. a local AWS-compatible server).
    pub endpoint: Option<String>,
    /// Static credentials instead of the environment's.
    pub credentials: Option<AwsCredentials>,
}

/// Static AWS credentials (`access_key_id`, `secret_access_key`, `session_token`).
#[derive(Clone, PartialEq, Eq)]
pub struct AwsCredentials {
    /// The access key id.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
    /// A session token (temporary credentials).
    pub session_token: Option<String>,
}

/// Never shows the secret parts.
impl std::fmt::Debug for AwsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsOptions")
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field(
                "access_key_id",
                &self.credentials.as_ref().map(|c| &c.access_key_id),
            )
            .finish_non_exhaustive()
    }
}

impl AwsOptions {
    /// Takes `region`, `endpoint` and the credential options from `opts`: `access_key_id`
    /// and `secret_access_key` go together.
    pub fn take(opts: &mut WithOptions) -> sluice_engine::Result<Self> {
        let region = opts.take_str("region");
        let endpoint = opts.take_str("endpoint");
        let id = opts.take_str("access_key_id");
        let secret = opts.take_str("secret_access_key");
        let token = opts.take_str("session_token");
        let credentials = match (id, secret) {
            (Some(access_key_id), Some(secret_access_key)) => Some(AwsCredentials {
                access_key_id,
                secret_access_key,
                session_token: token,
            }),
            (None, None) if token.is_none() => None,
            _ => {
                return Err(opts.error(
                    "options `access_key_id` and `secret_access_key` go together (and `session_token` only with them)",
                ));
            }
        };
        Ok(Self {
            region,
            endpoint,
            credentials,
        })
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
        if let Some(c) = &self.credentials {
            loader = loader.credentials_provider(aws_sdk_kinesis::config::Credentials::new(
                &c.access_key_id,
                &c.secret_access_key,
                c.session_token.clone(),
                None,
                "sluice connector options",
            ));
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
        if let Some(c) = &self.credentials {
            builder = builder
                .with_access_key_id(&c.access_key_id)
                .with_secret_access_key(&c.secret_access_key);
            if let Some(token) = &c.session_token {
                builder = builder.with_token(token);
            }
        }
        builder
            .build()
            .map_err(|e| ConnectorError::InvalidConfig(format!("s3 bucket `{bucket}`: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: &[(&str, &str)]) -> WithOptions {
        WithOptions::new(
            "source `s`".to_string(),
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn static_credentials_go_together_and_never_show() {
        let mut opts = options(&[
            ("access_key_id", "AKIDEXAMPLE"),
            ("secret_access_key", "wJalrXUtnFEMI-secret"),
        ]);
        let aws = AwsOptions::take(&mut opts).unwrap();
        let c = aws.credentials.as_ref().unwrap();
        assert_eq!(c.secret_access_key, "wJalrXUtnFEMI-secret");
        let shown = format!("{aws:?}");
        assert!(
            shown.contains("AKIDEXAMPLE") && !shown.contains("wJalr"),
            "{shown}"
        );
        let mut opts = options(&[("secret_access_key", "wJalrXUtnFEMI-secret")]);
        let err = AwsOptions::take(&mut opts).unwrap_err().to_string();
        assert!(
            err.contains("go together") && !err.contains("wJalr"),
            "{err}"
        );
        assert!(
            AwsOptions::take(&mut options(&[]))
                .unwrap()
                .credentials
                .is_none()
        );
    }
}
