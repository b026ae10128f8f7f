#!/usr/bin/env python3
"""Reads one stream of a Sluice lake on an S3 server the way Athena users' tools do, and its
Athena DDL with sqlglot; prints what they saw as JSON for the Rust test to compare.

    check_lake.py ENDPOINT BUCKET PREFIX STREAM DDL_FILE SUM_COLUMN

- pyarrow: the stream's prefix as a Hive-partitioned Parquet dataset (dt, hour as strings);
- DuckDB (+ httpfs from the duckdb-ext-httpfs package, offline): read_parquet over s3://… with
  hive_partitioning;
- sqlglot: the DDL parsed in the Athena dialect.
"""

import json
import os
import sys
import sysconfig

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pyarrow.fs as pafs
import sqlglot
from sqlglot import exp


def main():
    endpoint, bucket, prefix, stream, ddl_file, sum_column = sys.argv[1:7]
    host = endpoint.removeprefix("http://")
    base = f"{bucket}/{prefix}/processed/{stream}" if prefix else f"{bucket}/processed/{stream}"
    out = {}

    s3 = pafs.S3FileSystem(
        endpoint_override=host,
        scheme="http",
        access_key="test",
        secret_key="test",
        region="us-east-1",
    )
    partitioning = ds.partitioning(
        pa.schema([("dt", pa.string()), ("hour", pa.string())]), flavor="hive"
    )
    dataset = ds.dataset(base, filesystem=s3, format="parquet", partitioning=partitioning)
    table = dataset.to_table()
    files = sorted(dataset.files)
    first = pq.read_schema(files[0], filesystem=s3) if files else None
    key = sorted(
        zip(
            table.column("user_id").to_pylist(),
            [t.strftime("%Y-%m-%d %H:%M:%S") for t in table.column("window_start").to_pylist()],
            table.column(sum_column).to_pylist(),
        )
    )
    out["pyarrow"] = {
        "rows": table.num_rows,
        "all": [list(r) for r in key],
        "sum": pc.sum(table.column(sum_column)).as_py(),
        "partitions": sorted({f"{d}/{h}" for d, h in zip(table.column("dt").to_pylist(), table.column("hour").to_pylist())}),
        "files": len(files),
        "file_schema": [[f.name, str(f.type)] for f in first] if first else [],
    }

    con = duckdb.connect()
    extensions = os.path.join(sysconfig.get_paths()["purelib"], "duckdb_ext", "extensions")
    con.execute(f"SET extension_directory = '{extensions}'")
    con.execute("LOAD httpfs")
    con.execute(
        "CREATE SECRET lake (TYPE s3, KEY_ID 'test', SECRET 'test', REGION 'us-east-1', "
        f"ENDPOINT '{host}', URL_STYLE 'path', USE_SSL false)"
    )
    rows, total, partitions = con.execute(
        f"SELECT count(*), sum({sum_column}), count(DISTINCT (dt, hour)) "
        f"FROM read_parquet('s3://{base}/*/*/*.parquet', hive_partitioning = true)"
    ).fetchone()
    out["duckdb"] = {"rows": rows, "sum": total, "partitions": partitions}

    with open(ddl_file) as f:
        ddl = f.read()
    parsed = sqlglot.parse_one(ddl, read="athena")
    schema = parsed.this  # exp.Schema: the table and its columns
    columns = [
        [c.name, c.args["kind"].sql(dialect="hive").lower()]
        for c in schema.expressions
        if isinstance(c, exp.ColumnDef)
    ]
    properties = parsed.args["properties"].expressions
    partitioned = next(p for p in properties if isinstance(p, exp.PartitionedByProperty))
    location = next(p for p in properties if isinstance(p, exp.LocationProperty))
    out["sqlglot"] = {
        "table": schema.this.name,
        "columns": columns,
        "partitioned_by": [
            [c.name, c.args["kind"].sql(dialect="hive").lower()]
            for c in partitioned.this.expressions
        ],
        "location": location.this.name,
        "stored_as_parquet": any(
            isinstance(p, exp.FileFormatProperty) and p.this.name.upper() == "PARQUET"
            for p in properties
        ),
        "properties": {
            p.name: p.args["value"].name
            for p in properties
            if type(p) is exp.Property and p.args.get("value") is not None
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
