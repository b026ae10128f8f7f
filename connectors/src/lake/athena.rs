//! The Athena table of a stream: `CREATE EXTERNAL TABLE` DDL over its processed prefix.
//!
//! Parquet, the stream's columns with their Athena (Hive DDL) types, `PARTITIONED BY (dt
//! string, hour string)` and partition projection, so Athena computes the partitions from the
//! query and no `MSCK REPAIR TABLE` / `ALTER TABLE ADD PARTITION` is ever needed:
//! `dt` is a date projection (`yyyy-MM-dd`, from the stream's first event date to now: a
//! query without a `dt` filter projects the days the stream has, not every day since 1970),
//! `hour` an integer projection
//! (`00`…`23`), and `storage.location.template` spells the Hive layout. Rows without an event
//! time land in Hive's default partition, which projection does not cover (Athena users query
//! those with `"$path"` or a table without projection).
//!
//! The DDL is also written next to the data as `processed/<stream>/_athena_table.sql`: Athena
//! skips objects whose names start with `_`.

use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use object_store::path::Path;

use super::{Lake, Zone};
use crate::error::{ConnectorError, Result};

/// Name of the DDL file in a stream's processed prefix.
pub const ATHENA_DDL_FILE: &str = "_athena_table.sql";

/// The Athena DDL of `stream` (rows of `schema` as they are in the lake) in `lake`, its
/// `dt` projection starting at `first_day` (`YYYY-MM-DD`: the stream's first event date);
/// `database` qualifies the table name when given.
pub fn athena_ddl(
    lake: &Lake,
    stream: &str,
    schema: &Schema,
    first_day: &str,
    database: Option<&str>,
) -> Result<String> {
    let mut columns = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        if matches!(f.name().as_str(), "dt" | "hour") {
            return Err(ConnectorError::InvalidConfig(format!(
                "stream `{stream}`: column `{}` has the name of a partition column (dt, hour); rename it for Athena",
                f.name()
            )));
        }
        columns.push(format!("  {} {}", quote(f.name()), hive_type(f, true)?));
    }
    let location = lake.dir_url(Zone::Processed, stream);
    let table = match database {
        Some(db) => format!("{}.{}", quote(db), quote(stream)),
        None => quote(stream),
    };
    let properties: Vec<String> = projection_properties(&location, first_day)
        .into_iter()
        .map(|(k, v)| format!("  '{k}' = '{v}'"))
        .collect();
    Ok(format!(
        "CREATE EXTERNAL TABLE IF NOT EXISTS {table} (\n{columns}\n)\n\
         PARTITIONED BY (dt string, hour string)\n\
         STORED AS PARQUET\n\
         LOCATION '{location}'\n\
         TBLPROPERTIES (\n{properties}\n)",
        columns = columns.join(",\n"),
        properties = properties.join(",\n"),
    ))
}

/// The table properties of a stream's table over `location`: Parquet with Snappy, and
/// partition projection with `dt` from `first_day` to now and `hour` 00–23 (the same in
/// the Athena DDL and the Glue table).
pub(crate) fn projection_properties(
    location: &str,
    first_day: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("parquet.compression", "SNAPPY".into()),
        ("projection.enabled", "true".into()),
        ("projection.dt.type", "date".into()),
        ("projection.dt.format", "yyyy-MM-dd".into()),
        ("projection.dt.range", format!("{first_day},NOW")),
        ("projection.dt.interval", "1".into()),
        ("projection.dt.interval.unit", "DAYS".into()),
        ("projection.hour.type", "integer".into()),
        ("projection.hour.range", "0,23".into()),
        ("projection.hour.digits", "2".into()),
        (
            "storage.location.template",
            format!("{location}dt=${{dt}}/hour=${{hour}}"),
        ),
    ]
}

/// The type of a column in a Glue table (struct members unquoted).
#[cfg(feature = "aws")]
pub(crate) fn glue_type(f: &Field) -> Result<String> {
    hive_type(f, false)
}

/// Writes the DDL of `stream` next to its data (see the module docs).
pub async fn write_athena_ddl(lake: &Lake, stream: &str, ddl: &str) -> Result<Path> {
    let path = lake.dir(Zone::Processed, stream).join(ATHENA_DDL_FILE);
    lake.put(&path, format!("{ddl};\n").into_bytes()).await?;
    Ok(path)
}

/// An identifier in Athena DDL: backquoted (Hive style), backquotes doubled.
fn quote(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// The Hive type of a column as the lake stores it; `quoted`: struct members backquoted (as
/// Athena DDL takes them).
fn hive_type(f: &Field, quoted: bool) -> Result<String> {
    let athena_type = |f: &Field| hive_type(f, quoted);
    let member = |name: &str| {
        if quoted {
            quote(name)
        } else {
            name.to_string()
        }
    };
    let unsupported = || {
        ConnectorError::InvalidConfig(format!(
            "column `{}`: type {} has no Athena equivalent",
            f.name(),
            f.data_type()
        ))
    };
    Ok(match f.data_type() {
        DataType::Boolean => "boolean".into(),
        DataType::Int8 => "tinyint".into(),
        DataType::Int16 | DataType::UInt8 => "smallint".into(),
        DataType::Int32 | DataType::UInt16 => "int".into(),
        DataType::Int64 | DataType::UInt32 | DataType::UInt64 => "bigint".into(),
        DataType::Float16 | DataType::Float32 => "float".into(),
        DataType::Float64 => "double".into(),
        DataType::Decimal32(p, s)
        | DataType::Decimal64(p, s)
        | DataType::Decimal128(p, s)
        | DataType::Decimal256(p, s) => format!("decimal({p},{s})"),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "string".into(),
        DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView
        | DataType::FixedSizeBinary(_) => "binary".into(),
        DataType::Date32 | DataType::Date64 => "date".into(),
        DataType::Timestamp(
            TimeUnit::Second | TimeUnit::Millisecond | TimeUnit::Microsecond,
            _,
        ) => "timestamp".into(),
        DataType::List(item)
        | DataType::LargeList(item)
        | DataType::ListView(item)
        | DataType::FixedSizeList(item, _) => format!("array<{}>", athena_type(item)?),
        DataType::Struct(fields) => {
            let members = fields
                .iter()
                .map(|m| Ok(format!("{}:{}", member(m.name()), athena_type(m)?)))
                .collect::<Result<Vec<_>>>()?;
            format!("struct<{}>", members.join(","))
        }
        DataType::Map(entries, _) => match entries.data_type() {
            DataType::Struct(kv) if kv.len() == 2 => {
                format!("map<{},{}>", athena_type(&kv[0])?, athena_type(&kv[1])?)
            }
            _ => return Err(unsupported()),
        },
        DataType::Dictionary(_, value) => {
            athena_type(&Field::new(f.name(), value.as_ref().clone(), true))?
        }
        _ => return Err(unsupported()),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn ddl_has_athena_types_partitions_and_projection() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
        let schema = Schema::new(vec![
            Field::new("customer", DataType::Utf8, true),
            Field::new(
                "window_start",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new("n", DataType::Int64, false),
            Field::new("total", DataType::Decimal128(12, 2), true),
            Field::new(
                "tags",
                DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
                true,
            ),
        ]);
        let ddl = athena_ddl(&lake, "revenue", &schema, "2024-03-01", Some("analytics")).unwrap();
        assert!(ddl.starts_with("CREATE EXTERNAL TABLE IF NOT EXISTS `analytics`.`revenue` ("));
        for needle in [
            "`customer` string,",
            "`window_start` timestamp,",
            "`n` bigint,",
            "`total` decimal(12,2),",
            "`tags` array<string>\n)",
            "PARTITIONED BY (dt string, hour string)",
            "STORED AS PARQUET",
            "'projection.hour.digits' = '2'",
            "'projection.dt.range' = '2024-03-01,NOW'",
        ] {
            assert!(ddl.contains(needle), "{needle} not in\n{ddl}");
        }
        let location = lake.dir_url(Zone::Processed, "revenue");
        assert!(ddl.contains(&format!("LOCATION '{location}'")), "{ddl}");
        assert!(
            ddl.contains(&format!("'{location}dt=${{dt}}/hour=${{hour}}'")),
            "{ddl}"
        );
        let clash = Schema::new(vec![Field::new("dt", DataType::Utf8, true)]);
        assert!(athena_ddl(&lake, "s", &clash, "2024-03-01", None).is_err());
    }

    #[tokio::test]
    async fn the_first_partition_day_is_the_earliest_dt_folder_listed_and_committed() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(lake.first_partition_day("s").await.unwrap(), None);
        assert_eq!(lake.stats().first_day("s"), None);
        let at = |dt: &str, hour: &str| {
            lake.dir(Zone::Processed, "s")
                .join(format!("dt={dt}"))
                .join(format!("hour={hour}"))
                .join("f.parquet")
        };
        for (dt, hour) in [
            ("2024-03-02", "05"),
            ("2024-02-28", "23"),
            ("__HIVE_DEFAULT_PARTITION__", "__HIVE_DEFAULT_PARTITION__"),
            ("2024-03-01", "00"),
        ] {
            lake.put(&at(dt, hour), b"x".to_vec()).await.unwrap();
        }
        lake.put(
            &lake.dir(Zone::Processed, "s").join(ATHENA_DDL_FILE),
            b"x".to_vec(),
        )
        .await
        .unwrap();
        assert_eq!(
            lake.first_partition_day("s").await.unwrap().as_deref(),
            Some("2024-02-28")
        );
        assert_eq!(lake.stats().first_day("s").as_deref(), Some("2024-02-28"));
        assert_eq!(lake.first_partition_day("other").await.unwrap(), None);
    }
}
