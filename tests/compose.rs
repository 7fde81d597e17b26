//! docker-compose.yml cannot run here (no Docker engine), so its consistency is checked instead:
//! the services and settings the docs promise, and init SQL that exists in sql/.

use serde_yaml::Value;

fn compose() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
        .expect("docker-compose.yml");
    serde_yaml::from_str(&text).expect("docker-compose.yml parses as YAML")
}

fn env_keys(service: &Value) -> Vec<String> {
    service["environment"]
        .as_mapping()
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn services_and_settings_are_the_documented_ones() {
    let c = compose();
    let services = c["services"].as_mapping().expect("services");
    for name in ["postgres", "kafka", "clickhouse", "stream", "sink"] {
        assert!(services.contains_key(name), "service {name} missing");
    }
    let pg_cmd: Vec<&str> = c["services"]["postgres"]["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        pg_cmd.contains(&"wal_level=logical"),
        "postgres must run with wal_level=logical"
    );
    for name in ["postgres", "kafka", "clickhouse"] {
        assert!(
            !c["services"][name]["healthcheck"].is_null(),
            "{name} has no healthcheck"
        );
    }
    let stream = env_keys(&c["services"]["stream"]);
    for k in ["CDC_RELAY_PG_URL", "CDC_RELAY_KAFKA_BROKERS"] {
        assert!(stream.contains(&k.to_string()), "stream lacks {k}");
    }
    let sink = env_keys(&c["services"]["sink"]);
    for k in [
        "CDC_RELAY_KAFKA_BROKERS",
        "CDC_RELAY_CLICKHOUSE_URL",
        "CDC_RELAY_CLICKHOUSE_USER",
        "CDC_RELAY_CLICKHOUSE_PASSWORD",
    ] {
        assert!(sink.contains(&k.to_string()), "sink lacks {k}");
    }
    // Every setting compose passes is one the binary reads.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/config");
    let main_rs: String = std::fs::read_dir(dir)
        .unwrap()
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
        .collect();
    for k in stream.iter().chain(sink.iter()) {
        assert!(
            main_rs.contains(&format!("\"{k}\"")),
            "{k} is not a setting of the binary"
        );
    }
}

#[test]
fn init_sql_mounts_exist() {
    let c = compose();
    let volumes = c["services"]["postgres"]["volumes"].as_sequence().unwrap();
    let mut mounted = 0;
    for v in volumes.iter().filter_map(Value::as_str) {
        if let Some(rest) = v.strip_prefix("./") {
            let host = rest.split(':').next().unwrap();
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(host);
            assert!(path.is_file(), "{} is mounted but missing", path.display());
            mounted += 1;
        }
    }
    assert_eq!(mounted, 3, "schema, seed data and roles are mounted");
}
