//! The S3 landing zone against a real S3 + SQS server (moto, started by
//! `scripts/services.sh`): files land in a bucket whose `ObjectCreated` notifications go to an
//! SQS queue; valid, mixed, gzip-compressed and corrupt files, keys that need URL decoding,
//! duplicate notifications and a restart — every row ends up exactly once in the source or in
//! the errors zone. CSV (header, any column order) and Parquet sources list their prefix.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sluice_tests::{error_lines, files_with_ext, pg_connect, scalar, start_server, wait_for};

fn s3_endpoint() -> String {
    std::env::var("SLUICE_TEST_S3").unwrap_or_else(|_| {
        panic!(
            "SLUICE_TEST_S3 is not set: run the tests with scripts/test.sh, which starts moto, \
             or first `eval \"$(scripts/services.sh start)\"`"
        )
    })
}

/// Runs tests/python/landing.py (boto3, pyarrow) against the S3 + SQS server.
fn landing(args: &[&str]) -> String {
    let python = std::env::var("SLUICE_TEST_PYTHON")
        .expect("SLUICE_TEST_PYTHON is not set: run the tests with scripts/test.sh");
    let script = std::path::Path::new(&manifest_dir()).join("python/landing.py");
    let out = Command::new(python)
        .arg(script)
        .args(args)
        .env("AWS_ENDPOINT_URL", s3_endpoint())
        .output()
        .expect("the test Python runs");
    assert!(
        out.status.success(),
        "landing.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Uploads `body` as `key`, gzip-compressed when `gzip`.
fn put(dir: &Path, bucket: &str, key: &str, body: impl AsRef<[u8]>, gzip: bool) {
    let file = dir.join(key.replace('/', "_"));
    std::fs::write(&file, body).unwrap();
    let mut args = vec!["put", bucket, key, file.to_str().unwrap()];
    if gzip {
        args.push("--gzip");
    }
    landing(&args);
}

fn invoice(id: &str, amount: &str) -> String {
    format!(r#"{{"invoice_id":"{id}","amount":{amount},"ts":"2024-05-01T08:00:00Z"}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn landed_files_are_ingested_exactly_once_and_bad_ones_reach_the_errors_zone() {
    let endpoint = s3_endpoint();
    let bucket = format!("landing-{}", std::process::id());
    let queue = landing(&["setup", &bucket, "invoices/"]);
    let files = tempfile::tempdir().unwrap();
    let dir = files.path();
    // Landed before the source exists: found by the listing at start (and its notification
    // waits in the queue: a duplicate).
    put(
        dir,
        &bucket,
        "invoices/2024/05/01/a.jsonl",
        [invoice("a1", "1"), invoice("a2", "2"), invoice("a3", "3")].join("\n"),
        false,
    );

    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let pg = pg_connect(server.pg_addr).await;
    pg.batch_execute(&format!(
        "CREATE SOURCE invoices (invoice_id TEXT NOT NULL, amount DOUBLE NOT NULL, ts TIMESTAMP NOT NULL)
         WITH (connector = 's3', path = 's3://{bucket}/invoices/', format = 'json',
               notifications = '{queue}', endpoint = '{endpoint}');
         CREATE STREAM all_invoices WITH (rollover_interval = '100 ms') AS SELECT * FROM invoices;
         CREATE SOURCE invoices_csv (invoice_id TEXT NOT NULL, amount DOUBLE, ts TIMESTAMP NOT NULL)
         WITH (connector = 's3', path = 's3://{bucket}/csv/', format = 'csv',
               poll_interval = '200 ms', endpoint = '{endpoint}');
         CREATE STREAM all_csv WITH (rollover_interval = '100 ms') AS SELECT * FROM invoices_csv;
         CREATE SOURCE invoices_pq (invoice_id TEXT NOT NULL, amount DOUBLE, ts TIMESTAMP NOT NULL)
         WITH (connector = 's3', path = 's3://{bucket}/parquet/', format = 'parquet',
               poll_interval = '200 ms', endpoint = '{endpoint}');
         CREATE STREAM all_pq WITH (rollover_interval = '100 ms') AS SELECT * FROM invoices_pq"
    ))
    .await
    .unwrap();

    // A key with a space and a plus (URL-encoded in the notification), one bad line in it.
    put(
        dir,
        &bucket,
        "invoices/2024/05/01/my file+1.jsonl",
        [
            invoice("m1", "10"),
            invoice("m2", "\"lots\""),
            invoice("m3", "30"),
        ]
        .join("\n"),
        false,
    );
    // Gzip, detected from the bytes.
    put(
        dir,
        &bucket,
        "invoices/b.jsonl.gz",
        (1..=4)
            .map(|i| invoice(&format!("b{i}"), "5"))
            .collect::<Vec<_>>()
            .join("\n"),
        true,
    );
    // Not gzip at all, though it says so: unreadable.
    put(
        dir,
        &bucket,
        "invoices/c.json",
        b"\x1f\x8b\x08\x00garbage",
        false,
    );
    // The same object again (same ETag) and its notification once more.
    put(
        dir,
        &bucket,
        "invoices/2024/05/01/a.jsonl",
        [invoice("a1", "1"), invoice("a2", "2"), invoice("a3", "3")].join("\n"),
        false,
    );
    landing(&["notify", &queue, &bucket, "invoices/2024/05/01/a.jsonl"]);
    // CSV with a header in another column order, gzip; Parquet.
    put(
        dir,
        &bucket,
        "csv/x.csv.gz",
        "amount,invoice_id,ts\n7.5,x1,2024-05-01T08:00:00Z\n8.5,x2,2024-05-01T08:00:01Z\n",
        true,
    );
    landing(&[
        "put-parquet",
        &bucket,
        "parquet/p.parquet",
        r#"[{"invoice_id":"p1","amount":1.5,"ts":"2024-05-01T08:00:00Z"},
            {"invoice_id":"p2","amount":2.5,"ts":"2024-05-01T08:00:01Z"},
            {"invoice_id":"p3","amount":null,"ts":"2024-05-01T08:00:02Z"}]"#,
    ]);

    wait_for("every invoice", Duration::from_secs(60), || async {
        (scalar(&pg, "SELECT count(*) FROM all_invoices").await == 9).then_some(())
    })
    .await;
    wait_for(
        "the csv and parquet rows",
        Duration::from_secs(60),
        || async {
            let csv = scalar(&pg, "SELECT count(*) FROM all_csv").await;
            let pq = scalar(&pg, "SELECT count(*) FROM all_pq").await;
            (csv == 2 && pq == 3).then_some(())
        },
    )
    .await;
    // Duplicates would have arrived by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(scalar(&pg, "SELECT count(*) FROM all_invoices").await, 9);
    assert_eq!(
        scalar(&pg, "SELECT count(DISTINCT invoice_id) FROM all_invoices").await,
        9
    );
    assert_eq!(
        scalar(&pg, "SELECT CAST(sum(amount) * 10 AS BIGINT) FROM all_csv").await,
        160
    );
    assert_eq!(
        scalar(&pg, "SELECT count(amount) FROM all_pq").await,
        2,
        "a NULL amount stays NULL"
    );

    let errors = error_lines(lake.path(), "invoices");
    assert_eq!(errors.len(), 2, "{errors:?}");
    let bad_line = errors
        .iter()
        .find(|e| {
            e["origin"]
                == format!("s3://{bucket}/invoices/2024/05/01/my file+1.jsonl line 2").as_str()
        })
        .unwrap_or_else(|| panic!("no bad line: {errors:?}"));
    assert!(bad_line["payload"].as_str().unwrap().contains("lots"));
    let unreadable = errors
        .iter()
        .find(|e| e["origin"] == format!("s3://{bucket}/invoices/c.json").as_str())
        .unwrap_or_else(|| panic!("no unreadable object: {errors:?}"));
    assert!(
        unreadable["reason"]
            .as_str()
            .unwrap()
            .contains("unreadable object"),
        "{unreadable}"
    );
    // The unreadable object is kept whole in the errors zone.
    let kept = files_with_ext(&lake.path().join("errors/invoices"), "json");
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].to_str().unwrap().ends_with(".c.json"), "{kept:?}");
    assert_eq!(std::fs::read(&kept[0]).unwrap(), b"\x1f\x8b\x08\x00garbage");

    // A restart on the same lake ingests nothing twice, and goes on with new files.
    server.shutdown().await;
    let server = start_server(lake.path()).await;
    let pg = pg_connect(server.pg_addr).await;
    put(dir, &bucket, "invoices/d.jsonl", invoice("d1", "4"), false);
    wait_for("the new invoice", Duration::from_secs(60), || async {
        let n = scalar(
            &pg,
            "SELECT count(*) FROM all_invoices WHERE invoice_id = 'd1'",
        )
        .await;
        (n == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(scalar(&pg, "SELECT count(*) FROM all_invoices").await, 10);
    assert_eq!(scalar(&pg, "SELECT count(*) FROM all_csv").await, 2);
    server.shutdown().await;
}

/// The package's directory in the checkout being tested, read when the test runs: a
/// compile-time `env!` would name the checkout the cached test binary was built in.
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR is set by cargo test")
}
