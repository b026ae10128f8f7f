//! Security end to end, against the `sluice` binary as users run it: TLS with a CA the test
//! makes (psql `sslmode=verify-full`, psycopg and asyncpg, curl over HTTPS), SCRAM-SHA-256
//! logins (wrong and missing passwords, unknown users, `NOLOGIN` roles, concurrent logins of
//! different users, a proof with junk appended), users, roles, grants and revokes, a row
//! policy applied to ad-hoc queries, to a stream and to a Kafka sink (the topic gets only
//! the allowed rows), HTTP 401/403/2xx with Basic and bearer tokens, secrets that never
//! show, ad-hoc SQL that reaches nothing but the lake, and the refusal to listen openly
//! without a password.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{Server, create_topic, kafka_brokers, read_topic, serve_ports, sluice};

const ROOT_PW: &str = "root-Pw-90417";
const ACME_PW: &str = "acme-Pw-55213";
const GLOBEX_PW: &str = "globex-Pw-88324";
const FEEDER_PW: &str = "feeder-Pw-11773";
const NOBODY_PW: &str = "nobody-Pw-33904";
const KAFKA_SECRET: &str = "kafka-Secret-66142";
const SECRET_KEY: &str = "test-secret-key-for-sealing-0123456789";

/// A CA, and a certificate it signed for `localhost` / 127.0.0.1: (ca.pem, cert, key).
fn make_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run openssl ({e}): install it (scripts/test.sh does)")
            });
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=sluice test CA",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

/// One psql session over TLS (`verify-full` against `ca`) as `user`: its output, or its
/// error output.
fn psql_as(
    port: u16,
    ca: &Path,
    user: &str,
    password: Option<&str>,
    sql: &str,
) -> Result<String, String> {
    let conninfo = format!(
        "host=localhost port={port} dbname=sluice user={user} sslmode=verify-full sslrootcert={}",
        ca.display()
    );
    let mut cmd = Command::new("psql");
    cmd.args([
        "-X",
        "-A",
        "-t",
        "-w",
        "-v",
        "ON_ERROR_STOP=1",
        &conninfo,
        "-c",
        sql,
    ])
    .env_remove("PGPASSWORD");
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run `psql` ({e}): install the PostgreSQL client (scripts/test.sh does)")
    });
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn root(port: u16, ca: &Path, sql: &str) -> String {
    psql_as(port, ca, "sluice", Some(ROOT_PW), sql).unwrap_or_else(|e| panic!("`{sql}`: {e}"))
}

/// curl over HTTPS (verifying against `ca`): the status code and the body.
fn curl(port: u16, ca: &Path, path: &str, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--cacert"])
        .arg(ca)
        .args(args)
        .arg(format!("https://localhost:{port}{path}"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run curl ({e}): install it (scripts/test.sh does)"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.trim().parse().unwrap_or_else(|_| {
            panic!(
                "curl {path}: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        }),
        body.to_string(),
    )
}

fn post_events(port: u16, ca: &Path, auth: &[&str], lines: &[&str]) -> (u16, String) {
    let body = lines.join("\n");
    let mut args = vec![
        "-X",
        "POST",
        "-H",
        "Content-Type: application/x-ndjson",
        "--data-binary",
        &body,
    ];
    args.extend_from_slice(auth);
    curl(port, ca, "/v1/sources/orders/events", &args)
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The SQLSTATE a tokio-postgres login of `user` with `password` fails with (none: it
/// logged in).
fn login_sqlstate(port: u16, user: &str, password: &str) -> Option<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let conn =
            format!("host=127.0.0.1 port={port} dbname=sluice user={user} password={password}");
        match tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
            Ok(_) => None,
            Err(e) => Some(
                e.as_db_error()
                    .map(|d| d.code().code().to_string())
                    .unwrap_or_else(|| format!("no SQLSTATE: {e}")),
            ),
        }
    })
}

fn serve_secure(
    lake: &Path,
    certs: &(PathBuf, PathBuf, PathBuf),
    log: &Path,
) -> (Server, u16, u16) {
    let stderr = std::fs::File::create(log).unwrap();
    serve_ports(|cmd| {
        cmd.env("SLUICE_LAKE", lake)
            .env("SLUICE_PASSWORD", ROOT_PW)
            .env("SLUICE_SECRET_KEY", SECRET_KEY)
            .env("SLUICE_TLS_CERT", &certs.1)
            .env("SLUICE_TLS_KEY", &certs.2)
            .env("SLUICE_LOG", "debug")
            .stderr(stderr);
    })
}

#[test]
fn users_grants_policies_tokens_and_secrets_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let certs = make_certificates(dir.path());
    let ca = certs.0.clone();
    let log = dir.path().join("sluice.log");
    let (mut server, pg, http) = serve_secure(&lake, &certs, &log);

    // TLS, verified against the CA; SCRAM for the superuser.
    let info = root(pg, &ca, "\\conninfo");
    assert!(info.contains("SSL connection"), "{info}");
    let err = psql_as(pg, &ca, "sluice", Some("wrong"), "SELECT 1").unwrap_err();
    assert!(
        err.contains("password authentication failed for user \"sluice\""),
        "{err}"
    );
    let err = psql_as(pg, &ca, "sluice", None, "SELECT 1").unwrap_err();
    assert!(err.contains("no password supplied"), "{err}");
    assert_eq!(
        login_sqlstate(pg, "sluice", "wrong").as_deref(),
        Some("28P01")
    );
    assert_eq!(
        login_sqlstate(pg, "ghost", "anything").as_deref(),
        Some("28P01")
    );
    assert_eq!(login_sqlstate(pg, "sluice", ROOT_PW), None);

    let brokers = kafka_brokers();
    let topic = format!("security-acme-{}", std::process::id());
    create_topic(&brokers, &topic, 1);
    root(
        pg,
        &ca,
        &format!(
            "CREATE SOURCE orders (customer TEXT NOT NULL, amount BIGINT NOT NULL, ts TIMESTAMP NOT NULL,
                                   WATERMARK FOR ts AS ts - INTERVAL '1 second')
               WITH (connector = 'http');
             CREATE STREAM orders_all WITH (checkpoint_interval = '200 ms') AS SELECT * FROM orders;
             CREATE USER acme WITH PASSWORD '{ACME_PW}';
             CREATE USER globex PASSWORD '{GLOBEX_PW}';
             CREATE USER feeder PASSWORD '{FEEDER_PW}';
             CREATE USER nobody PASSWORD '{NOBODY_PW}';
             CREATE ROLE customers PASSWORD '{NOBODY_PW}';
             GRANT customers TO acme, globex;
             GRANT SELECT ON orders_all TO customers;
             GRANT CREATE ON DATABASE sluice TO acme;
             GRANT INSERT ON orders TO feeder;
             CREATE POLICY acme_rows ON orders_all FOR SELECT TO acme USING (customer = 'acme');
             CREATE POLICY globex_rows ON orders_all TO globex USING (customer = 'globex');
             CREATE SECRET kafka_pw AS '{KAFKA_SECRET}'"
        ),
    );
    // A role without LOGIN: the right password still does not let it in.
    assert_eq!(
        login_sqlstate(pg, "customers", NOBODY_PW).as_deref(),
        Some("28000")
    );
    assert_eq!(
        login_sqlstate(pg, "acme", GLOBEX_PW).as_deref(),
        Some("28P01")
    );

    // What acme creates from the stream carries acme's policy: a stream, and a Kafka sink
    // (made before the orders arrive: a sink delivers what its input emits from then on).
    psql_as(
        pg,
        &ca,
        "acme",
        Some(ACME_PW),
        &format!(
            "CREATE STREAM acme_orders AS SELECT customer, amount, ts FROM orders_all WHERE amount > 0;
             CREATE SINK acme_out FROM orders_all
               WITH (connector = 'kafka', brokers = '{brokers}', topic = '{topic}', format = 'json')"
        ),
    )
    .unwrap();
    // HTTP: credentials, then INSERT on the source.
    let acme_rows = [
        r#"{"customer":"acme","amount":1,"ts":"2026-01-01T00:00:01"}"#,
        r#"{"customer":"globex","amount":2,"ts":"2026-01-01T00:00:02"}"#,
        r#"{"customer":"acme","amount":3,"ts":"2026-01-01T00:00:03"}"#,
    ];
    let more_rows = [
        r#"{"customer":"initech","amount":4,"ts":"2026-01-01T00:00:04"}"#,
        r#"{"customer":"acme","amount":5,"ts":"2026-01-01T00:00:05"}"#,
        r#"{"customer":"globex","amount":6,"ts":"2026-01-01T00:00:06"}"#,
    ];
    let (code, body) = post_events(http, &ca, &[], &acme_rows);
    assert_eq!(code, 401, "{body}");
    let (code, _) = curl(http, &ca, "/metrics", &[]);
    assert_eq!(code, 401);
    let (code, _) = post_events(
        http,
        &ca,
        &["-u", &format!("feeder:{GLOBEX_PW}")],
        &acme_rows,
    );
    assert_eq!(code, 401);
    let (code, body) = post_events(
        http,
        &ca,
        &["-u", &format!("globex:{GLOBEX_PW}")],
        &acme_rows,
    );
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("permission denied for source orders"),
        "{body}"
    );
    let (code, body) = post_events(
        http,
        &ca,
        &["-u", &format!("feeder:{FEEDER_PW}")],
        &acme_rows,
    );
    assert_eq!(code, 200, "{body}");
    let token = psql_as(
        pg,
        &ca,
        "feeder",
        Some(FEEDER_PW),
        "CREATE TOKEN feed FOR USER feeder",
    )
    .unwrap();
    let token = token
        .trim()
        .split('|')
        .nth(1)
        .expect("name|token")
        .to_string();
    assert!(token.starts_with("sluice_"), "{token}");
    let bearer = format!("Authorization: Bearer {token}");
    let (code, body) = post_events(http, &ca, &["-H", &bearer], &more_rows);
    assert_eq!(code, 200, "{body}");
    let (code, _) = curl(http, &ca, "/metrics", &["-H", &bearer]);
    assert_eq!(code, 200);
    psql_as(pg, &ca, "feeder", Some(FEEDER_PW), "DROP TOKEN feed").unwrap();
    let (code, _) = post_events(http, &ca, &["-H", &bearer], &more_rows);
    assert_eq!(code, 401);

    // Ad-hoc queries: each customer sees its rows, however it asks.
    wait_until("the six orders", || {
        root(pg, &ca, "SELECT count(*) FROM orders_all").trim() == "6"
    });
    let count = |user: &str, password: &str, sql: &str| psql_as(pg, &ca, user, Some(password), sql);
    assert_eq!(
        count("acme", ACME_PW, "SELECT count(*) FROM orders_all")
            .unwrap()
            .trim(),
        "3"
    );
    assert_eq!(
        count("globex", GLOBEX_PW, "SELECT count(*) FROM orders_all")
            .unwrap()
            .trim(),
        "2"
    );
    assert_eq!(
        count("acme", ACME_PW, "SELECT count(*) FROM (SELECT * FROM public.orders_all) o JOIN sluice.public.orders_all p ON o.amount = p.amount").unwrap().trim(),
        "3"
    );
    assert_eq!(
        count(
            "acme",
            ACME_PW,
            "WITH x AS (SELECT * FROM orders_all) SELECT count(*) FROM x WHERE customer <> 'acme'"
        )
        .unwrap()
        .trim(),
        "0"
    );
    let err = count("nobody", NOBODY_PW, "SELECT count(*) FROM orders_all").unwrap_err();
    assert!(
        err.contains("permission denied for stream orders_all"),
        "{err}"
    );
    let err = count("nobody", NOBODY_PW, "EXPLAIN SELECT * FROM orders_all").unwrap_err();
    assert!(err.contains("permission denied"), "{err}");
    let err = count(
        "globex",
        GLOBEX_PW,
        "CREATE STREAM mine AS SELECT * FROM orders_all",
    )
    .unwrap_err();
    assert!(err.contains("permission denied to create"), "{err}");
    let err = count("acme", ACME_PW, "DROP STREAM orders_all").unwrap_err();
    assert!(err.contains("must be owner of stream orders_all"), "{err}");
    let err = count("acme", ACME_PW, "CREATE USER mallory").unwrap_err();
    assert!(err.contains("permission denied to create roles"), "{err}");
    let err = count(
        "acme",
        ACME_PW,
        "CREATE POLICY all_rows ON orders_all USING (true)",
    )
    .unwrap_err();
    assert!(err.contains("must be owner of stream orders_all"), "{err}");

    // The session is the user who logged in.
    assert_eq!(
        count("acme", ACME_PW, "SELECT current_user, session_user")
            .unwrap()
            .trim(),
        "acme|acme"
    );
    assert_eq!(
        count("acme", ACME_PW, "SHOW is_superuser").unwrap().trim(),
        "off"
    );
    assert_eq!(root(pg, &ca, "SHOW is_superuser").trim(), "on");

    // Drivers over TLS with SCRAM (the same policies).
    let python = std::env::var("SLUICE_TEST_PYTHON")
        .expect("SLUICE_TEST_PYTHON is not set: run the tests with scripts/test.sh");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/secure_drivers.py");
    let out = Command::new(python)
        .arg(script)
        .args(["127.0.0.1", &pg.to_string()])
        .arg(&ca)
        .args(["acme", ACME_PW, "globex", GLOBEX_PW])
        .output()
        .expect("the test Python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ok all"),
        "secure_drivers.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let stored = root(
        pg,
        &ca,
        "SELECT sql FROM sluice.streams WHERE name = 'acme_orders'",
    );
    assert!(stored.contains("customer = 'acme'"), "{stored}");
    // Every acme order, and only those.
    wait_until("acme's orders on the topic", || {
        read_topic(&brokers, &topic).len() >= 3
    });
    std::thread::sleep(Duration::from_secs(1));
    let delivered: Vec<serde_json::Value> = read_topic(&brokers, &topic)
        .iter()
        .map(|v| serde_json::from_slice(v).unwrap())
        .collect();
    let mut amounts: Vec<i64> = delivered
        .iter()
        .map(|v| v["amount"].as_i64().unwrap())
        .collect();
    amounts.sort();
    assert_eq!(amounts, vec![1, 3, 5], "{delivered:?}");
    assert!(
        delivered.iter().all(|v| v["customer"] == "acme"),
        "{delivered:?}"
    );
    // Revoked: the role's members read no more; acme still reads what it owns.
    root(pg, &ca, "REVOKE SELECT ON orders_all FROM customers");
    let err = count("globex", GLOBEX_PW, "SELECT count(*) FROM orders_all").unwrap_err();
    assert!(err.contains("permission denied"), "{err}");
    wait_until("acme's own stream", || {
        count("acme", ACME_PW, "SELECT count(*) FROM acme_orders").is_ok_and(|n| n.trim() == "3")
    });

    // A secret: used by name, never shown.
    root(
        pg,
        &ca,
        &format!(
            "CREATE SINK secret_out FROM orders_all
               WITH (connector = 'kafka', brokers = '{brokers}', topic = '{topic}-2', format = 'json',
                     'properties.sasl.username' = 'svc', 'properties.sasl.password' = SECRET kafka_pw)"
        ),
    );
    let shown = root(
        pg,
        &ca,
        "SELECT sql FROM sluice.sinks WHERE name = 'secret_out'",
    );
    // A credential written out in the statement is stored as written: the user is told.
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-w"])
        .arg(format!(
            "host=localhost port={pg} dbname=sluice user=sluice sslmode=verify-full sslrootcert={}",
            ca.display()
        ))
        .arg("-c")
        .arg(format!(
            "CREATE SINK clear_out FROM orders_all WITH (connector = 'kafka', brokers = '{brokers}',
               topic = '{topic}-3', format = 'json', 'properties.sasl.password' = 'not-a-secret')"
        ))
        .env("PGPASSWORD", ROOT_PW)
        .output()
        .unwrap();
    let notice = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{notice}");
    assert!(
        notice.contains(
            "NOTICE:  option `properties.sasl.password` is stored in the catalog as written"
        ),
        "{notice}"
    );
    assert!(shown.contains("SECRET kafka_pw"), "{shown}");
    let err = count("acme", ACME_PW, &format!(
        "CREATE SINK stolen FROM acme_orders WITH (connector = 'kafka', brokers = '{brokers}', topic = 'x',
           'properties.sasl.password' = SECRET kafka_pw)")).unwrap_err();
    assert!(
        err.contains("permission denied for secret kafka_pw"),
        "{err}"
    );
    let err = root_err(pg, &ca, "CREATE SECRET kafka_pw AS 'again'");
    assert!(
        err.contains("already exists") && !err.contains(KAFKA_SECRET),
        "{err}"
    );

    // A restart keeps users, grants, policies and secrets (sealed with the same key).
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let _ = server.wait();
    drop(server);
    let log2 = dir.path().join("sluice-2.log");
    let (server, pg, _http) = serve_secure(&lake, &certs, &log2);
    let count = |user: &str, password: &str, sql: &str| psql_as(pg, &ca, user, Some(password), sql);
    assert_eq!(
        count("acme", ACME_PW, "SELECT count(*) FROM acme_orders")
            .unwrap()
            .trim(),
        "3"
    );
    assert!(count("globex", GLOBEX_PW, "SELECT count(*) FROM orders_all").is_err());
    let failures = root(
        pg,
        &ca,
        "SELECT name, status FROM sluice.sinks ORDER BY name",
    );
    assert!(!failures.contains("failed"), "{failures}");
    drop(server);

    // Nothing secret in the lake, the logs or what clients were told.
    let mut leaks = vec![];
    let mut files = vec![log.clone(), log2.clone()];
    let mut dirs = vec![lake.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
    }
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        for secret in [
            ROOT_PW,
            ACME_PW,
            GLOBEX_PW,
            FEEDER_PW,
            NOBODY_PW,
            KAFKA_SECRET,
            SECRET_KEY,
            &token,
        ] {
            if bytes.windows(secret.len()).any(|w| w == secret.as_bytes()) {
                leaks.push(format!("{} holds {secret}", f.display()));
            }
        }
    }
    assert!(leaks.is_empty(), "{leaks:?}");
}

fn root_err(port: u16, ca: &Path, sql: &str) -> String {
    psql_as(port, ca, "sluice", Some(ROOT_PW), sql).expect_err(sql)
}

#[test]
fn ad_hoc_sql_reaches_only_the_lake() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret.csv"), "a,b\n1,2\n").unwrap();
    let certs = make_certificates(dir.path());
    let ca = certs.0.clone();
    let log = dir.path().join("sluice.log");
    let (_server, pg, _) = serve_secure(&lake, &certs, &log);
    let file = outside.join("secret.csv");
    let file = file.display();
    let written = outside.join("written.csv");
    for sql in [
        format!("SELECT * FROM '{file}'"),
        format!("SELECT * FROM read_csv('{file}')"),
        format!("SELECT * FROM read_parquet('{file}')"),
        "SELECT * FROM 's3://another-bucket/data.parquet'".to_string(),
        "SELECT * FROM 'https://example.com/data.csv'".to_string(),
        format!("CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '{file}'"),
        format!("COPY (SELECT 1 AS a) TO '{}'", written.display()),
        format!(
            "COPY (SELECT 1 AS a) TO '{}' STORED AS CSV",
            written.display()
        ),
        format!("COPY orders FROM '{file}'"),
        format!("SELECT pg_read_file('{file}')"),
        "INSERT INTO t VALUES (1)".to_string(),
    ] {
        let err = root_err(pg, &ca, &sql);
        assert!(err.contains("ERROR"), "`{sql}`: {err}");
        assert!(!err.contains("1,2"), "`{sql}` read the file: {err}");
    }
    assert!(!written.exists(), "COPY wrote a file outside the lake");
}

#[test]
fn concurrent_logins_of_different_users_never_mix() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let certs = make_certificates(dir.path());
    let ca = certs.0.clone();
    let log = dir.path().join("sluice.log");
    let (_server, pg, _) = serve_secure(&lake, &certs, &log);
    root(
        pg,
        &ca,
        &format!(
            "CREATE USER alice PASSWORD '{ACME_PW}'; CREATE USER bob PASSWORD '{GLOBEX_PW}';
             GRANT CREATE ON DATABASE sluice TO alice"
        ),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut tasks = vec![];
        for i in 0..40 {
            // Alice, Bob, and a wrong password, interleaved.
            let (user, password, ok) = match i % 3 {
                0 => ("alice", ACME_PW, true),
                1 => ("bob", GLOBEX_PW, true),
                _ => ("alice", GLOBEX_PW, false),
            };
            tasks.push(tokio::spawn(async move {
                let conn = format!(
                    "host=127.0.0.1 port={pg} dbname=sluice user={user} password={password}"
                );
                match tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
                    Ok((client, connection)) => {
                        tokio::spawn(connection);
                        assert!(ok, "{user} logged in with another's password");
                        // Only alice may create: the session is the user who logged in.
                        let r = client
                            .simple_query(&format!("CREATE SECRET s{i} AS 'v'"))
                            .await;
                        assert_eq!(r.is_ok(), user == "alice", "{user}: {r:?}");
                    }
                    Err(e) => {
                        assert!(!ok, "{user}: {e}");
                        assert_eq!(e.as_db_error().unwrap().code().code(), "28P01");
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

/// SCRAM by hand: a valid proof with junk appended is refused; the same proof alone logs in.
#[test]
fn a_scram_proof_with_junk_appended_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let certs = make_certificates(dir.path());
    let log = dir.path().join("sluice.log");
    let (_server, pg, _) = serve_secure(&lake, &certs, &log);
    for (junk, logs_in) in [(",x=junk", false), ("junk", false), ("", true)] {
        let answer = scram_login(pg, "sluice", ROOT_PW, junk);
        assert_eq!(answer.is_ok(), logs_in, "junk {junk:?}: {answer:?}");
    }
}

/// Logs in over the raw protocol, appending `junk` to the client-final message: `Ok` on
/// `AuthenticationOk`, else the error's SQLSTATE and message.
fn scram_login(port: u16, user: &str, password: &str, junk: &str) -> Result<(), String> {
    use aws_lc_rs::{digest, hmac, pbkdf2};
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as B64;
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut s2 = s.try_clone().unwrap();
    let mut startup = 196_608i32.to_be_bytes().to_vec();
    for kv in ["user", user, "database", "sluice"] {
        startup.extend_from_slice(kv.as_bytes());
        startup.push(0);
    }
    startup.push(0);
    let mut msg = ((startup.len() + 4) as i32).to_be_bytes().to_vec();
    msg.extend(startup);
    s2.write_all(&msg).unwrap();
    let mut read = || -> (u8, Vec<u8>) {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).unwrap();
        let len = i32::from_be_bytes(head[1..5].try_into().unwrap()) as usize - 4;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        (head[0], body)
    };
    let error = |body: &[u8]| {
        let fields: Vec<String> = body
            .split(|b| *b == 0)
            .filter(|f| f.first().is_some_and(|c| *c == b'C' || *c == b'M'))
            .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
            .collect();
        fields.join(": ")
    };
    let (t, body) = read();
    assert_eq!(
        (t, &body[..4]),
        (b'R', &10i32.to_be_bytes()[..]),
        "SASL offered"
    );
    assert_eq!(&body[4..], b"SCRAM-SHA-256\0\0", "only SCRAM-SHA-256");
    let bare = "n=,r=fyko+d2lbbFgONRv9qkxdawL";
    let first = format!("n,,{bare}");
    let mut p = b"SCRAM-SHA-256\0".to_vec();
    p.extend((first.len() as i32).to_be_bytes());
    p.extend(first.as_bytes());
    let mut out = vec![b'p'];
    out.extend(((p.len() + 4) as i32).to_be_bytes());
    out.extend(p);
    s2.write_all(&out).unwrap();
    let (t, body) = read();
    if t == b'E' {
        return Err(error(&body));
    }
    assert_eq!(&body[..4], &11i32.to_be_bytes());
    let server_first = String::from_utf8(body[4..].to_vec()).unwrap();
    let mut f = server_first.split(',');
    let nonce = f.next().unwrap().strip_prefix("r=").unwrap().to_string();
    let salt = B64
        .decode(f.next().unwrap().strip_prefix("s=").unwrap())
        .unwrap();
    let iterations: u32 = f
        .next()
        .unwrap()
        .strip_prefix("i=")
        .unwrap()
        .parse()
        .unwrap();
    let mut salted = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        std::num::NonZeroU32::new(iterations).unwrap(),
        &salt,
        password.as_bytes(),
        &mut salted,
    );
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let client_key = hmac::sign(&key, b"Client Key");
    let stored = digest::digest(&digest::SHA256, client_key.as_ref());
    let without_proof = format!("c=biws,r={nonce}");
    let auth = format!("{bare},{server_first},{without_proof}");
    let signature = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, stored.as_ref()),
        auth.as_bytes(),
    );
    let proof: Vec<u8> = client_key
        .as_ref()
        .iter()
        .zip(signature.as_ref())
        .map(|(a, b)| a ^ b)
        .collect();
    let last = format!("{without_proof},p={}{junk}", B64.encode(proof));
    let mut out = vec![b'p'];
    out.extend(((last.len() + 4) as i32).to_be_bytes());
    out.extend(last.as_bytes());
    s2.write_all(&out).unwrap();
    loop {
        let (t, body) = read();
        match t {
            b'E' => return Err(error(&body)),
            b'R' if body[..4] == 0i32.to_be_bytes() => return Ok(()),
            _ => {}
        }
    }
}

#[test]
fn an_open_address_without_a_password_is_refused() {
    let lake = tempfile::tempdir().unwrap();
    let out = sluice()
        .args([
            "serve",
            "--pg-listen",
            "0.0.0.0:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("SLUICE_LAKE", lake.path())
        .env_remove("SLUICE_PASSWORD")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0 (--pg-listen) without a password")
            && err.contains("SLUICE_PASSWORD"),
        "{err}"
    );
    // With a password it starts there.
    let mut child = Server::from(
        sluice()
            .args([
                "serve",
                "--pg-listen",
                "0.0.0.0:0",
                "--http-listen",
                "0.0.0.0:0",
            ])
            .env("SLUICE_LAKE", lake.path())
            .env("SLUICE_PASSWORD", ROOT_PW)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let started = std::io::BufRead::lines(stdout)
        .map_while(Result::ok)
        .any(|l| l.starts_with("sluice: http listening on 0.0.0.0:"));
    assert!(started, "the server did not start on 0.0.0.0");
}
