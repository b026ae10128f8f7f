#!/usr/bin/env python3
"""Describes each hour partition of one stream of a Sluice lake, as batch users' tools see it;
prints JSON for the Rust tests to compare.

    partitions.py LAKE STREAM CHECKSUM [ENDPOINT [HOURS]]

LAKE is a local directory or s3://bucket[/prefix] (then ENDPOINT is the S3 server's URL);
HOURS (comma separated `dt/hour`) limits the reading to those partitions (all when empty);
CHECKSUM is a DuckDB expression over the stream's columns whose sum fingerprints a partition's
rows, e.g. `hash(user_id, url, ts)`. The stream's event-time column must be `ts`.

For each `dt/hour`: its data files (name, bytes) in name order; from DuckDB over the whole
stream (hive_partitioning, as Athena users read it): rows, distinct `ts`, the checksum and the
latest `ts`; from pyarrow: whether `ts` ascends through the files in name order; and its
`_SUCCESS` marker (parsed), if any.
"""

import json
import os
import sys
import sysconfig

import duckdb
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def main():
    # A compaction that commits between the listing and the reads removes files listed
    # (as it would under an Athena query): describe the lake again.
    for attempt in range(10):
        try:
            print(json.dumps(describe(), sort_keys=True))
            return
        except (OSError, duckdb.Error) as e:
            if attempt == 9:
                raise
            print(f"retrying: {e}", file=sys.stderr)


def describe():
    lake, stream, checksum = sys.argv[1:4]
    endpoint = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] else None
    only = {h for h in sys.argv[5].split(",") if h} if len(sys.argv) > 5 else set()
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    if lake.startswith("s3://"):
        host = endpoint.removeprefix("http://")
        fs = pafs.S3FileSystem(
            endpoint_override=host,
            scheme="http",
            access_key="test",
            secret_key="test",
            region="us-east-1",
        )
        base = f"{lake.removeprefix('s3://').rstrip('/')}/processed/{stream}"
        url = f"s3://{base}"
        extensions = os.path.join(sysconfig.get_paths()["purelib"], "duckdb_ext", "extensions")
        con.execute(f"SET extension_directory = '{extensions}'")
        con.execute("LOAD httpfs")
        con.execute(
            "CREATE SECRET lake (TYPE s3, KEY_ID 'test', SECRET 'test', REGION 'us-east-1', "
            f"ENDPOINT '{host}', URL_STYLE 'path', USE_SSL false)"
        )
    else:
        fs = pafs.LocalFileSystem()
        base = os.path.join(os.path.abspath(lake), "processed", stream)
        url = base

    out = {}
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(base.rstrip("/")) + 1:]
        parts = rel.split("/")
        if len(parts) != 3 or not parts[0].startswith("dt=") or not parts[1].startswith("hour="):
            continue
        key = f"{parts[0][3:]}/{parts[1][5:]}"
        p = out.setdefault(key, {"files": [], "marker": None})
        name = parts[2]
        if name == "_SUCCESS":
            with fs.open_input_stream(info.path) as f:
                p["marker"] = json.loads(f.read())
        elif name.endswith(".parquet") and not name.startswith(("_", ".")):
            p["files"].append([name, info.size])

    out = {k: p for k, p in out.items() if not only or k in only}
    for key, p in out.items():
        p["files"].sort()
        previous = None
        ascending = True
        for name, _ in p["files"]:
            path = f"{base}/dt={key[:10]}/hour={key[11:]}/{name}"
            for t in pq.read_table(path, filesystem=fs, columns=["ts"]).column("ts").to_pylist():
                if previous is not None and t < previous:
                    ascending = False
                previous = t
        p["ascending"] = ascending

    if any(p["files"] for p in out.values()):
        globs = ", ".join(
            f"'{url}/dt={k[:10]}/hour={k[11:]}/*.parquet'" for k in sorted(out) if out[k]["files"]
        ) if only else f"'{url}/*/*/*.parquet'"
        query = (
            f"SELECT dt || '/' || hour, count(*), count(DISTINCT ts), sum({checksum})::VARCHAR, "
            f"strftime(max(ts), '%Y-%m-%dT%H:%M:%S.%fZ') "
            f"FROM read_parquet([{globs}], hive_partitioning = true, "
            f"hive_types = {{'dt': VARCHAR, 'hour': VARCHAR}}) GROUP BY 1"
        )
        for key, rows, distinct, total, latest in con.execute(query).fetchall():
            p = out.setdefault(key, {"files": [], "marker": None, "ascending": True})
            p.update({"rows": rows, "distinct_ts": distinct, "checksum": total, "max_ts": latest})
    return out


if __name__ == "__main__":
    main()
