#!/usr/bin/env python3
"""Drives the S3 + SQS server (moto) for the landing-zone tests, with boto3 and pyarrow.

    landing.py setup BUCKET PREFIX            -> prints the queue URL; bucket notifications
                                                 of ObjectCreated under PREFIX go to it
    landing.py put BUCKET KEY FILE [--gzip]   -> uploads FILE's bytes (gzip-compressed first)
    landing.py put-parquet BUCKET KEY JSON    -> uploads a Parquet file of the JSON rows
    landing.py notify QUEUE_URL BUCKET KEY    -> sends an ObjectCreated notification for KEY
                                                 again (S3 delivers at least once)

Endpoint and credentials come from AWS_ENDPOINT_URL / AWS_* in the environment.
"""

import gzip
import io
import json
import sys
import urllib.parse

import boto3
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq


def main():
    s3 = boto3.client("s3")
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "setup":
        bucket, prefix = args
        sqs = boto3.client("sqs")
        s3.create_bucket(Bucket=bucket)
        url = sqs.create_queue(QueueName=f"{bucket}-events")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        s3.put_bucket_notification_configuration(
            Bucket=bucket,
            NotificationConfiguration={
                "QueueConfigurations": [
                    {
                        "QueueArn": arn,
                        "Events": ["s3:ObjectCreated:*"],
                        "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": prefix}]}},
                    }
                ]
            },
        )
        print(url)
    elif cmd == "put":
        bucket, key, path = args[:3]
        with open(path, "rb") as f:
            body = f.read()
        if "--gzip" in args:
            body = gzip.compress(body)
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    elif cmd == "put-parquet":
        bucket, key, rows = args
        table = pa.Table.from_pylist(json.loads(rows))
        ts = pa.compute.strptime(table.column("ts"), format="%Y-%m-%dT%H:%M:%SZ", unit="us")
        table = table.set_column(
            table.schema.get_field_index("ts"), "ts", ts.cast(pa.timestamp("us", tz="UTC"))
        )
        out = io.BytesIO()
        pq.write_table(table, out)
        s3.put_object(Bucket=bucket, Key=key, Body=out.getvalue())
    elif cmd == "notify":
        url, bucket, key = args
        head = s3.head_object(Bucket=bucket, Key=key)
        event = {
            "Records": [
                {
                    "eventName": "ObjectCreated:Put",
                    "s3": {
                        "bucket": {"name": bucket},
                        "object": {
                            "key": urllib.parse.quote_plus(key),
                            "eTag": head["ETag"].strip('"'),
                            "size": head["ContentLength"],
                        },
                    },
                }
            ]
        }
        boto3.client("sqs").send_message(QueueUrl=url, MessageBody=json.dumps(event))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
