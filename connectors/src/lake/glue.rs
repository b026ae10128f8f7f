//! Stream tables in the AWS Glue Data Catalog (`sluice serve --glue-database NAME`): the
//! table Athena, Spark, Trino and EMR read a stream's processed files through, with the
//! same columns, partition keys (`dt`, `hour`), Parquet SerDe, location and partition
//! projection as the stream's Athena DDL ([`super::athena_ddl`]).
//!
//! Region, endpoint and credentials come from the AWS environment, as for S3
//! (`AWS_ENDPOINT_URL` reaches a compatible server such as moto's).

use arrow::datatypes::Schema;
use aws_sdk_glue::types::{
    Column, DatabaseInput, PartitionInput, SerDeInfo, StorageDescriptor, TableInput,
};

use super::athena::{glue_type, projection_properties};
use super::{Lake, PartitionMarker, Zone};
use crate::error::{ConnectorError, Result};

/// A Glue database the streams' tables are registered in.
#[derive(Debug, Clone)]
pub struct GlueCatalog {
    client: aws_sdk_glue::Client,
    database: String,
}

fn glue_error(what: &str, e: impl std::fmt::Display) -> ConnectorError {
    ConnectorError::Glue(format!("{what}: {e}"))
}

impl GlueCatalog {
    /// The catalog of Glue database `database`, reached through the AWS environment.
    pub async fn connect(database: &str) -> Result<Self> {
        if database.is_empty() {
            return Err(ConnectorError::InvalidConfig(
                "the Glue database name is empty".into(),
            ));
        }
        let config = crate::aws::AwsOptions::default().sdk_config().await;
        Ok(Self {
            client: aws_sdk_glue::Client::new(&config),
            database: database.to_string(),
        })
    }

    /// The database's name.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// Creates the database unless it exists.
    pub async fn ensure_database(&self) -> Result<()> {
        let input = DatabaseInput::builder()
            .name(&self.database)
            .description("Sluice streams (processed zone)")
            .build()
            .map_err(|e| glue_error("a database", e))?;
        match self
            .client
            .create_database()
            .database_input(input)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_already_exists_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(glue_error(
                &format!("creating database `{}`", self.database),
                aws_sdk_glue::error::DisplayErrorContext(e),
            )),
        }
    }

    /// Creates or updates the table of `stream` (its lake rows have `schema`), its `dt`
    /// projection starting at `first_day`.
    pub async fn upsert_table(
        &self,
        lake: &Lake,
        stream: &str,
        schema: &Schema,
        first_day: &str,
    ) -> Result<()> {
        let input = table_input(lake, stream, schema, first_day)?;
        let created = self
            .client
            .create_table()
            .database_name(&self.database)
            .table_input(input.clone())
            .send()
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_already_exists_exception()) =>
            {
                self.client
                    .update_table()
                    .database_name(&self.database)
                    .table_input(input)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        glue_error(
                            &format!("updating table `{}.{stream}`", self.database),
                            aws_sdk_glue::error::DisplayErrorContext(e),
                        )
                    })
            }
            Err(e) => Err(glue_error(
                &format!("creating table `{}.{stream}`", self.database),
                aws_sdk_glue::error::DisplayErrorContext(e),
            )),
        }
    }

    /// Creates or updates the partition `marker` describes in the table of `stream` (whose
    /// lake rows have `schema`), with the marker's figures as its parameters:
    /// `sluice.complete` = `true`, `sluice.rows`, `sluice.max_event_time`,
    /// `sluice.completed_at`. (Athena's partition projection does not read partitions; Spark,
    /// Trino and batch jobs that list the table's partitions do.)
    pub async fn upsert_partition(
        &self,
        lake: &Lake,
        stream: &str,
        schema: &Schema,
        marker: &PartitionMarker,
    ) -> Result<()> {
        let location = format!(
            "{}dt={}/hour={}/",
            lake.dir_url(Zone::Processed, stream),
            marker.dt,
            marker.hour
        );
        let values = vec![marker.dt.clone(), marker.hour.clone()];
        let mut input = PartitionInput::builder()
            .set_values(Some(values.clone()))
            .storage_descriptor(storage_descriptor(schema, &location)?)
            .parameters("sluice.complete", "true")
            .parameters("sluice.rows", marker.rows.to_string())
            .parameters("sluice.completed_at", &marker.completed_at);
        if let Some(t) = &marker.max_event_time {
            input = input.parameters("sluice.max_event_time", t);
        }
        let input = input.build();
        let what = format!(
            "partition dt={}/hour={} of `{}.{stream}`",
            marker.dt, marker.hour, self.database
        );
        let created = self
            .client
            .create_partition()
            .database_name(&self.database)
            .table_name(stream)
            .partition_input(input.clone())
            .send()
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_already_exists_exception()) =>
            {
                self.client
                    .update_partition()
                    .database_name(&self.database)
                    .table_name(stream)
                    .set_partition_value_list(Some(values))
                    .partition_input(input)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        glue_error(
                            &format!("updating {what}"),
                            aws_sdk_glue::error::DisplayErrorContext(e),
                        )
                    })
            }
            Err(e) => Err(glue_error(
                &format!("creating {what}"),
                aws_sdk_glue::error::DisplayErrorContext(e),
            )),
        }
    }

    /// Deletes the table of `stream` (gone already: fine).
    pub async fn delete_table(&self, stream: &str) -> Result<()> {
        match self
            .client
            .delete_table()
            .database_name(&self.database)
            .name(stream)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_entity_not_found_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(glue_error(
                &format!("deleting table `{}.{stream}`", self.database),
                aws_sdk_glue::error::DisplayErrorContext(e),
            )),
        }
    }
}

/// The Glue table of `stream`: an external Parquet table over its processed prefix.
fn table_input(lake: &Lake, stream: &str, schema: &Schema, first_day: &str) -> Result<TableInput> {
    let location = lake.dir_url(Zone::Processed, stream);
    let storage = storage_descriptor(schema, &location)?;
    let column = |name: &str, ty: String| {
        Column::builder()
            .name(name)
            .r#type(ty)
            .build()
            .map_err(|e| glue_error("a column", e))
    };
    let mut table = TableInput::builder()
        .name(stream)
        .description(format!("Sluice stream `{stream}`"))
        .table_type("EXTERNAL_TABLE")
        .storage_descriptor(storage)
        .partition_keys(column("dt", "string".into())?)
        .partition_keys(column("hour", "string".into())?)
        .parameters("EXTERNAL", "TRUE")
        .parameters("classification", "parquet");
    for (k, v) in projection_properties(&location, first_day) {
        table = table.parameters(k, v);
    }
    table.build().map_err(|e| glue_error("a table", e))
}

/// Parquet files of `schema`'s columns at `location` (a table's or a partition's).
fn storage_descriptor(schema: &Schema, location: &str) -> Result<StorageDescriptor> {
    let column = |name: &str, ty: String| {
        Column::builder()
            .name(name)
            .r#type(ty)
            .build()
            .map_err(|e| glue_error("a column", e))
    };
    let columns = schema
        .fields()
        .iter()
        .map(|f| column(f.name(), glue_type(f)?))
        .collect::<Result<Vec<_>>>()?;
    let storage = StorageDescriptor::builder()
        .set_columns(Some(columns))
        .location(location)
        .input_format("org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat")
        .output_format("org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat")
        .serde_info(
            SerDeInfo::builder()
                .serialization_library(
                    "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe",
                )
                .parameters("serialization.format", "1")
                .build(),
        )
        .build();
    Ok(storage)
}
