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
