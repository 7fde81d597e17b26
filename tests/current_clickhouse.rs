//! What the sink sends to a current ClickHouse (26.9), executed by that ClickHouse embedded in
//! chdb-core (no server newer than 18.16 installs here; the suite's server is 18.16).
//!
//! - the schema statements, as `cdc-relay config clickhouse-schema --clickhouse-version 26.9`
//!   prints them (the same functions `ensure_schema` sends);
//! - the inserts, truncates and reads of [`ClickHouseWriter`]: the real client posts them to a
//!   loopback capture that records each request and answers `200 OK` with an empty body; the
//!   insert body (the crate's LZ4 framing) is checked and unpacked to the RowBinary it carries;
//! - the current-rows view after redeliveries, deletes and a truncate.
//!
//! tests/chdb/check_sink_sql.py runs the steps in chdb and compares the answers. It needs
//! `CDC_RELAY_CHDB_PYTHON`, a Python with chdb-core, which `scripts/services up` installs and
//! writes to .local/services.env.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use cdc_relay::event::ChangeEvent;
use cdc_relay::sink::clickhouse::schema::{self, ServerVersion};
use cdc_relay::sink::clickhouse::{
    ClickHouseConfig, ClickHouseWriter, SeedRow, SinkError, UserLoginRow,
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One request the client sent: its URL parameters and its body.
#[derive(Debug, Clone)]
struct Request {
    params: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// Records every HTTP request on a loopback port and answers each `200 OK` with no body.
struct Capture {
    url: String,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Capture {
    async fn start() -> Capture {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    while let Some(request) = read_request(&mut stream).await {
                        seen.lock().unwrap().push(request);
                        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
                        if stream.get_mut().write_all(ok).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Capture { url, requests }
    }

    /// The requests recorded since the last call.
    fn take(&self) -> Vec<Request> {
        std::mem::take(&mut *self.requests.lock().unwrap())
    }
}

/// One HTTP/1.1 request (Content-Length or chunked body); `None` at the end of the connection.
async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let target = line.split_whitespace().nth(1)?.to_string();
    let (mut length, mut chunked) = (0usize, false);
    loop {
        line.clear();
        r.read_line(&mut line).await.ok()?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().ok()?,
            "transfer-encoding" => chunked = value.trim().eq_ignore_ascii_case("chunked"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).await.ok()?;
            let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk).await.ok()?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        body.resize(length, 0);
        r.read_exact(&mut body).await.ok()?;
    }
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let params = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .collect();
    Some(Request { params, body })
}

/// `application/x-www-form-urlencoded` decoding.
fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// The data of ClickHouse's native compression framing (`decompress=1`), each frame's checksum
/// checked: [CityHash128 of the rest][0x82 = LZ4][compressed size incl. 9-byte header][size][data].
fn unframe(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while !body.is_empty() {
        assert!(body.len() >= 25, "truncated frame");
        let checksum = u128::from_le_bytes(body[..16].try_into().unwrap());
        let method = body[16];
        let compressed = u32::from_le_bytes(body[17..21].try_into().unwrap()) as usize;
        let size = u32::from_le_bytes(body[21..25].try_into().unwrap()) as usize;
        let frame = &body[16..16 + compressed];
        assert_eq!(
            cityhash_rs::cityhash_102_128(frame).rotate_right(64),
            checksum,
            "frame checksum"
        );
        assert_eq!(method, 0x82, "an LZ4 frame");
        out.extend(lz4_flex::block::decompress(&frame[9..], size).expect("LZ4 data"));
        body = &body[16 + compressed..];
    }
    out
}

/// A change as the sink turns a message into a row.
fn row(id: i64, op: &str, user: Option<&str>, time: Option<&str>, version: u64) -> UserLoginRow {
    let message = json!({
        "id": id, "op": op, "user": user, "event": "login", "timestamp": null,
        "event_time": time, "lsn": format!("0/{version:X}"), "version": version,
    });
    let (event, micros) = ChangeEvent::from_json_with_time(message.to_string().as_bytes()).unwrap();
    UserLoginRow::from_parts(event, micros).unwrap()
}

/// A row as the view check's query returns it in TSV.
fn tsv(r: &UserLoginRow) -> String {
    fn opt<T: ToString>(v: &Option<T>) -> String {
        v.as_ref().map_or("\\N".into(), T::to_string)
    }
    [
        r.id.to_string(),
        opt(&r.username),
        opt(&r.event_type),
        opt(&r.event_time),
        opt(&r.event_time_us),
        r.op.clone(),
        r._lsn.clone(),
        r._version.to_string(),
    ]
    .join("\t")
        + "\n"
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Steps {
    dir: PathBuf,
    steps: Vec<Value>,
    capture: Capture,
    writer: ClickHouseWriter,
    cfg: ClickHouseConfig,
    inserts: usize,
}

impl Steps {
    /// Inserts `rows` through the writer; the step runs the captured statement with its body.
    async fn insert(&mut self, rows: &[UserLoginRow]) {
        let body = self.insert_bytes(rows).await;
        self.inserts += 1;
        let file = self.dir.join(format!("insert-{}.rowbinary", self.inserts));
        std::fs::write(&file, &body.1).unwrap();
        self.steps.push(json!({
            "kind": "insert", "database": body.0["database"], "sql": body.0["query"],
            "file": file, "rows": rows.len(),
        }));
    }

    /// The URL parameters and the RowBinary bytes of the writer's insert of `rows`.
    async fn insert_bytes(&self, rows: &[UserLoginRow]) -> (BTreeMap<String, String>, Vec<u8>) {
        let rows: Vec<SeedRow> = rows.iter().cloned().map(SeedRow::plain).collect();
        self.writer.insert(&rows).await.unwrap();
        let request = self.one_request();
        let names: Vec<&str> = request.params.keys().map(String::as_str).collect();
        assert_eq!(names, ["database", "decompress", "query"]);
        assert_eq!(request.params["decompress"], "1");
        (request.params, unframe(&request.body))
    }

    /// The one request the last client call sent.
    fn one_request(&self) -> Request {
        let mut requests = self.capture.take();
        assert_eq!(requests.len(), 1, "one request: {requests:?}");
        requests.remove(0)
    }

    /// A step of the statement the last client call sent.
    fn sent(&mut self, expect: Value) {
        let request = self.one_request();
        self.sent_as(request, expect);
    }

    /// A step of a statement the client sent, with its URL parameters (the database, and the
    /// answer's format for reads).
    fn sent_as(&mut self, Request { params, body }: Request, expect: Value) {
        assert_eq!(params.get("database"), Some(&self.cfg.database));
        let sql = String::from_utf8(body).unwrap();
        self.push(json!({"kind": "sql", "sql": sql, "params": params}), expect);
    }

    /// A step of a statement of the test's own.
    fn sql(&mut self, sql: &str, expect: Value) {
        self.push(json!({"kind": "sql", "sql": sql}), expect);
    }

    fn push(&mut self, mut step: Value, expect: Value) {
        if let (Value::Object(step), Value::Object(expect)) = (&mut step, expect) {
            step.extend(expect);
        }
        self.steps.push(step);
    }

    /// The view, ORDER BY id, must show exactly `rows`.
    fn view_shows(&mut self, what: &str, rows: &[&UserLoginRow]) {
        let sql = format!(
            "SELECT id, username, event_type, toUnixTimestamp(event_time), event_time_us, op, _lsn, _version FROM {} ORDER BY id",
            self.cfg.qualified_view()
        );
        let expect: String = rows.iter().map(|r| tsv(r)).collect();
        self.sql(&sql, json!({"what": what, "expect_tsv": expect}));
    }
}

fn bin(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cdc-relay"))
        .args(args)
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The printed statements without their comments.
fn statements(printed: &str) -> Vec<String> {
    printed
        .split(";\n")
        .map(|s| {
            s.lines()
                .filter(|l| !l.starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
                .trim()
                .to_string()
        })
        .filter(|s| !s.trim().is_empty())
        .collect()
}

#[test]
fn printed_schema_follows_the_version() {
    let old = bin(&[
        "config",
        "clickhouse-schema",
        "--clickhouse-version",
        "18.16",
    ]);
    assert!(old.contains("ENGINE = ReplacingMergeTree(_version) ORDER BY id;"));
    assert!(!old.contains("_deleted)"), "{old}");
    let new = bin(&[
        "config",
        "clickhouse-schema",
        "--clickhouse-version",
        "26.9",
    ]);
    assert!(new.contains("ENGINE = ReplacingMergeTree(_version, _deleted) ORDER BY id;"));
    let cfg = config("http://unused".into());
    let expected: Vec<String> =
        schema::schema_statements(&cfg, ServerVersion::parse("26.9").unwrap())
            .into_iter()
            .map(|s| s.sql)
            .collect();
    assert_eq!(statements(&new), expected);
}

fn config(url: String) -> ClickHouseConfig {
    ClickHouseConfig {
        url,
        user: "default".into(),
        password: String::new(),
        database: "default".into(),
        table: "user_logins".into(),
        tls: None,
        cluster: None,
    }
}

#[tokio::test]
async fn current_clickhouse_runs_what_the_sink_sends() {
    let python = common::env("CDC_RELAY_CHDB_PYTHON");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join(format!(".local/current-clickhouse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let capture = Capture::start().await;
    let cfg = config(capture.url.clone());
    let mut s = Steps {
        dir: dir.clone(),
        steps: Vec::new(),
        writer: ClickHouseWriter::new(&cfg),
        capture,
        cfg: cfg.clone(),
        inserts: 0,
    };

    // The version query, then the schema as printed for 26.9 (the sink sends the same functions'
    // text), with what the sink expects of the answers.
    let client = cfg.client();
    let version = schema::server_version(&client, &cfg.url).await;
    assert!(matches!(
        version,
        Err(SinkError::Client {
            source: clickhouse::error::Error::RowNotFound,
            ..
        })
    ));
    s.sent(json!({"expect_contains": "26.9."}));
    let printed = bin(&[
        "config",
        "clickhouse-schema",
        "--clickhouse-version",
        "26.9",
    ]);
    for sql in statements(&printed) {
        let expect = if sql == schema::columns_sql(&cfg) {
            // check_table: every column with the type the sink writes.
            let cols: String = schema::COLUMNS
                .iter()
                .map(|(n, t)| format!("{n}\t{t}\n"))
                .chain(std::iter::once("_ingested_at\tDateTime\n".to_string()))
                .collect();
            json!({"expect_tsv": cols})
        } else {
            json!({})
        };
        s.sql(&sql, expect);
    }
    // A view the sink created is not taken for one of an earlier release on the next start.
    s.sql(
        &schema::view_ddl_sql(&cfg),
        json!({"expect_contains": cfg.truncates_name()}),
    );

    // First deliveries: a negative id, NULLs, a time before 1970 (NULL DateTime, exact micros).
    let first = [
        row(
            1,
            "insert",
            Some("alice"),
            Some("2024-05-01T12:00:00.123456"),
            10,
        ),
        row(2, "insert", Some("bob"), Some("2024-05-01 12:00:01"), 11),
        row(3, "insert", Some("carol"), None, 12),
        row(-5, "insert", Some("neg"), Some("2024-05-01T12:00:02"), 13),
        row(6, "insert", None, None, 14),
        row(
            7,
            "insert",
            Some("ancient"),
            Some("1900-01-01T00:00:00"),
            15,
        ),
    ];
    s.insert(&first).await;
    let [r1, r2, r3, rneg, r6, r7] = &first;
    s.view_shows("first deliveries", &[rneg, r1, r2, r3, r6, r7]);

    // Redeliveries with the same and a lower version change nothing; a higher one wins; a delete
    // hides the row.
    let second = [
        row(
            1,
            "insert",
            Some("alice"),
            Some("2024-05-01T12:00:00.123456"),
            10,
        ),
        row(2, "update", Some("bob-old"), None, 9),
        row(3, "update", Some("carol2"), Some("2024-05-02T00:00:00"), 20),
        row(6, "delete", None, None, 21),
    ];
    s.insert(&second).await;
    let r3b = &second[2];
    s.view_shows("redeliveries and a delete", &[rneg, r1, r2, r3b, r7]);

    // A truncate at version 16 hides every row below it, also rows arriving later.
    s.writer.truncate_before(16).await.unwrap();
    s.sent(json!({}));
    s.view_shows("after a truncate at 16", &[r3b]);
    let third = [
        row(8, "insert", Some("henry"), None, 16),
        row(9, "insert", Some("late"), None, 15),
        row(2, "update", Some("bob3"), None, 30),
        row(6, "insert", Some("six again"), None, 22),
    ];
    s.insert(&third).await;
    let [r8, _, r2c, r6c] = &third;
    s.view_shows(
        "after the truncate: at or above 16 shown",
        &[r2c, r3b, r6c, r8],
    );

    // The sink's reads: the truncate watermark, and stored rows below a version (for TOAST
    // columns) at or above the watermark: RowBinary the sink decodes as it decodes its rows.
    let watermark = s.writer.truncate_watermark().await;
    assert!(matches!(
        watermark,
        Err(SinkError::Client {
            source: clickhouse::error::Error::RowNotFound,
            ..
        })
    ));
    s.sent(json!({"expect_rows_hex": [hex(&16u64.to_le_bytes())]}));
    let below = s.writer.rows_below(&[2, 3, 9], &[], 31).await.unwrap();
    assert!(below.is_empty(), "the capture answers no rows");
    let read = s.one_request();
    // The rows as the sink encodes them, one insert each: the read must answer the same bytes.
    let mut rows_hex = Vec::new();
    for r in [r2c, r3b] {
        rows_hex.push(hex(&s.insert_bytes(std::slice::from_ref(r)).await.1));
    }
    s.sent_as(read, json!({"expect_rows_hex": rows_hex}));

    let manifest = dir.join("steps.json");
    std::fs::write(&manifest, serde_json::to_vec_pretty(&s.steps).unwrap()).unwrap();
    let out = Command::new(&python)
        .arg(root.join("tests/chdb/check_sink_sql.py"))
        .arg(&manifest)
        .arg(dir.join("chdb"))
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e}"));
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "chdb check failed ({}); steps in {}",
        out.status,
        dir.display()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Any table's statements on 26.9: its DDL, a JSONEachRow insert (Decimals bare, DateTime64 text),
/// the ALTERs of a schema change and the re-created view.
#[test]
fn current_clickhouse_runs_a_generic_tables_statements() {
    use cdc_relay::sink::clickhouse::evolve::{plan, Stored};
    use cdc_relay::sink::clickhouse::table::{
        create_table_sql, create_truncates_sql, create_view_sql, drop_view_sql, insert_body,
        TableNames,
    };
    use cdc_relay::types::{ColumnSchema, RelationSchema};
    let python = common::env("CDC_RELAY_CHDB_PYTHON");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join(format!(".local/current-generic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let version = ServerVersion::parse("26.9").unwrap();
    let col = |n: &str, oid, typmod, t: &str, nullable, attnum| ColumnSchema {
        attnum: Some(attnum),
        ..ColumnSchema::builtin(n, oid, typmod, t, nullable)
    };
    let v1 = RelationSchema {
        schema: "public".into(),
        table: "orders".into(),
        columns: vec![
            col("tenant", 23, -1, "integer", false, 1),
            col("code", 25, -1, "text", false, 2),
            col(
                "amount",
                1700,
                (38 << 16) + 10 + 4,
                "numeric(38,10)",
                true,
                3,
            ),
            col("at", 1184, -1, "timestamp with time zone", true, 4),
            col("n", 23, -1, "integer", false, 5),
        ],
        key: vec![0, 1],
    };
    // A type change, an added column, and `RENAME at TO at_old; ADD at text` in one migration.
    let mut v2 = v1.clone();
    v2.columns[4] = col("n", 20, -1, "bigint", false, 5);
    v2.columns.push(col("tags", 1009, -1, "text[]", true, 6));
    v2.columns[3].name = "at_old".into();
    v2.columns.push(col("at", 25, -1, "text", true, 7));
    let names = TableNames::new("gen", "orders");
    let p1 = plan(&names, &[], &v1, &[], version).unwrap();
    let event = |json: Value| ChangeEvent::from_json(&serde_json::to_vec(&json).unwrap()).unwrap();
    let row = p1
        .state
        .row(event(
            json!({"op":"insert","lsn":"0/1","version":1,"columns":{
            "tenant":1,"code":"a","amount":"-1234567890123456789012345678.0123456789",
            "at":"2024-01-01T12:00:00.5Z","n":7}}),
        ))
        .unwrap()
        .row;
    let (cols, body) = insert_body(&[row]);
    let cols: Vec<String> = cols.iter().map(|c| format!("`{c}`")).collect();
    let mut steps = vec![
        json!({"kind":"sql","sql":"CREATE DATABASE IF NOT EXISTS gen"}),
        json!({"kind":"sql","sql":create_table_sql(&names, &v1, version)}),
        json!({"kind":"sql","sql":create_truncates_sql(&names)}),
        json!({"kind":"sql","sql":create_view_sql(&names, &p1.view)}),
        json!({"kind":"sql","sql":format!("INSERT INTO {} ({}) FORMAT JSONEachRow {}", names.qualified(), cols.join(", "), String::from_utf8(body).unwrap())}),
    ];
    let caps = cdc_relay::sink::clickhouse::table::caps_of(version);
    let existing: Vec<Stored> = (0..v1.columns.len())
        .map(|i| Stored {
            attnum: v1.columns[i].attnum,
            ..Stored::new(
                &v1.columns[i].name,
                &cdc_relay::sink::clickhouse::table::column_type(&v1, i, caps),
            )
        })
        .collect();
    let history = vec![
        std::sync::Arc::new(v1.clone()),
        std::sync::Arc::new(v2.clone()),
    ];
    let p2 = plan(&names, &existing, &v2, &history, version).unwrap();
    assert_eq!(p2.changes.len(), 3, "{:?}", p2.changes);
    for c in &p2.changes {
        steps.push(json!({"kind":"sql","sql":c.sql(&names)}));
    }
    steps.push(json!({"kind":"sql","sql":drop_view_sql(&names)}));
    steps.push(json!({"kind":"sql","sql":create_view_sql(&names, &p2.view)}));
    // The old row's time under its new name, the new `at` empty; comments record the attnums.
    steps.push(json!({"kind":"sql","sql":"SELECT tenant, code, toString(amount), at_old, n, tags, at, toTypeName(n) FROM gen.orders_current",
        "expect_tsv":"1\ta\t-1234567890123456789012345678.0123456789\t2024-01-01 12:00:00.500000\t7\t[]\t\\N\tInt64\n"}));
    steps.push(json!({"kind":"sql","sql":"SELECT name, comment FROM system.columns WHERE database = 'gen' AND table = 'orders' AND name IN ('at', 'at__7') ORDER BY name",
        "expect_tsv":"at\tPostgreSQL attnum 4\nat__7\tPostgreSQL attnum 7\n"}));
    let manifest = dir.join("steps.json");
    std::fs::write(&manifest, serde_json::to_vec_pretty(&steps).unwrap()).unwrap();
    let out = Command::new(&python)
        .arg(root.join("tests/chdb/check_sink_sql.py"))
        .arg(&manifest)
        .arg(dir.join("chdb"))
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e}"));
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "chdb check failed; steps in {}",
        dir.display()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
