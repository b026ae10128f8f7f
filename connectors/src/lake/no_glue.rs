//! A build without the AWS SDK (feature `aws` off) has no Glue catalog: connecting fails
//! with a message saying so, and no value of [`GlueCatalog`] can exist.

use arrow::datatypes::Schema;

use super::{Lake, PartitionMarker};
use crate::error::{ConnectorError, Result};

/// Uninhabited: see the module docs.
#[derive(Debug, Clone)]
pub enum GlueCatalog {}

impl GlueCatalog {
    /// Fails: this build has no AWS SDK.
    pub async fn connect(_database: &str) -> Result<Self> {
        Err(ConnectorError::InvalidConfig(
            "this build of Sluice has no AWS SDK (feature `aws`): Glue registration is unavailable"
                .into(),
        ))
    }

    /// The database's name.
    pub fn database(&self) -> &str {
        match *self {}
    }

    /// Creates the database unless it exists.
    pub async fn ensure_database(&self) -> Result<()> {
        match *self {}
    }

    /// Creates or updates the table of `stream`.
    pub async fn upsert_table(&self, _: &Lake, _: &str, _: &Schema, _: &str) -> Result<()> {
        match *self {}
    }

    /// Creates or updates a completed partition of the table of `stream`.
    pub async fn upsert_partition(
        &self,
        _: &Lake,
        _: &str,
        _: &Schema,
        _: &PartitionMarker,
    ) -> Result<()> {
        match *self {}
    }

    /// Deletes the table of `stream`.
    pub async fn delete_table(&self, _: &str) -> Result<()> {
        match *self {}
    }
}
