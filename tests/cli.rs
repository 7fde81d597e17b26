//! The command line as a user meets it: help, config file, precedence, masking.

use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cdc-relay"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    c
}

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".local/test-config");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{name}-{}.toml", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn help_lists_every_command_and_hides_secret_values() {
    let out = bin().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for c in ["stream", "sink", "status", "config"] {
        assert!(help.contains(c), "{help}");
    }
    let out = bin()
        .args(["stream", "--help"])
        .env("CDC_RELAY_PG_URL", "postgres://u:topsecret@h/db")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--pg-url") && help.contains("CDC_RELAY_PG_URL"),
        "{help}"
    );
    assert!(
        !help.contains("topsecret"),
        "password shown in --help: {help}"
    );
    let out = bin()
        .args(["sink", "--help"])
        .env("CDC_RELAY_CLICKHOUSE_PASSWORD", "topsecret")
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("topsecret"));
}

#[test]
fn config_file_is_lowest_precedence_and_secrets_are_masked() {
    let file = write(
        "precedence",
        "pg_url = \"postgres://cdc:filesecret@127.0.0.1:1/cdc\"\nops = [\"insert\", \"delete\"]\ntopic = \"from_file\"\nbatch_interval = 50\n",
    );
    let out = bin()
        .args([
            "--config",
            file.to_str().unwrap(),
            "config",
            "check",
            "--for",
            "stream",
        ])
        .env("CDC_RELAY_TOPIC", "from_env")
        .env("CDC_RELAY_KAFKA_BROKERS", "k:1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("from_env") && !text.contains("from_file"),
        "env wins over the file: {text}"
    );
    assert!(text.contains("insert,delete"), "{text}");
    assert!(
        text.contains("postgres://cdc:****@127.0.0.1:1/cdc"),
        "{text}"
    );
    assert!(!text.contains("filesecret"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("CDC_RELAY_BATCH_INTERVAL_MS") && l.contains(" 50 ")),
        "{text}"
    );
    assert!(text.contains("stream   ok"), "{text}");
}

#[test]
fn unknown_config_keys_and_missing_settings_are_errors() {
    let file = write("unknown", "pg_urll = \"x\"\n");
    let out = bin()
        .args(["--config", file.to_str().unwrap(), "config", "check"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("unknown key \"pg_urll\"") && err.contains("pg_url"),
        "{err}"
    );

    let out = bin()
        .args(["config", "check", "--for", "sink"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("sink     INVALID") && text.contains("--kafka-brokers"),
        "{text}"
    );
}

#[test]
fn config_check_never_prints_a_secret_from_urls_or_key_value_strings() {
    let secrets = [
        "QuerySecret1",
        "SslKeySecret2",
        "ChUserSecret3",
        "ChQuerySecret4",
        "KafkaSecret5",
        "QuotedSecret6",
        "EscapedSecret7",
        "FileChSecret8",
    ];
    let check = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for s in secrets {
            assert!(!text.contains(s), "{s} shown:\n{text}");
        }
        text
    };

    // From the environment: URLs with secrets in user info and in query parameters.
    let text = check(
        bin()
            .args(["config", "check"])
            .env(
                "CDC_RELAY_PG_URL",
                "postgres://cdc@127.0.0.1:1/cdc?sslmode=disable&PASSWORD=QuerySecret1&sslpassword=SslKeySecret2",
            )
            .env(
                "CDC_RELAY_CLICKHOUSE_URL",
                "https://default:ChUserSecret3@ch.example:8443/?database=x&password=ChQuerySecret4",
            )
            .env("CDC_RELAY_KAFKA_BROKERS", "SASL_SSL://cdc:KafkaSecret5@k:9093"),
    );
    assert!(
        text.contains(
            "postgres://cdc@127.0.0.1:1/cdc?sslmode=disable&PASSWORD=****&sslpassword=****"
        ),
        "{text}"
    );
    assert!(
        text.contains("https://default:****@ch.example:8443/?database=x&password=****"),
        "{text}"
    );
    assert!(text.contains("SASL_SSL://cdc:****@k:9093"), "{text}");

    // From the config file: a key=value string with a quoted password (spaces around `=`, an
    // escaped quote), and a ClickHouse password.
    let file = write(
        "masking",
        "pg_url = \"host=127.0.0.1 port=1 user=cdc password = 'QuotedSecret6 \\\\' EscapedSecret7' dbname=cdc\"\nclickhouse_password = \"FileChSecret8\"\nkafka_brokers = \"k:1\"\nclickhouse_url = \"http://ch:8123\"\n",
    );
    let text = check(bin().args(["--config", file.to_str().unwrap(), "config", "check"]));
    assert!(
        text.contains("host=127.0.0.1 port=1 user=cdc password = '****' dbname=cdc"),
        "{text}"
    );
    assert!(text.contains("stream   ok"), "the string is valid: {text}");
}
