//! The TOML config file: its keys are the flag names, and it feeds the `CDC_RELAY_*` environment.

use super::Cli;

/// Every `CDC_RELAY_*` variable some command reads, with the flag it stands for.
pub fn known_settings() -> std::collections::BTreeMap<String, String> {
    use clap::CommandFactory;
    let mut out = std::collections::BTreeMap::new();
    fn walk(cmd: &clap::Command, out: &mut std::collections::BTreeMap<String, String>) {
        for arg in cmd.get_arguments() {
            if let (Some(env), Some(long)) = (arg.get_env(), arg.get_long()) {
                out.insert(env.to_string_lossy().into_owned(), long.to_string());
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, out);
        }
    }
    walk(&Cli::command(), &mut out);
    out
}

/// Reads the TOML file and exports each key as its `CDC_RELAY_*` variable, unless that variable is
/// already set (flags and the environment take precedence). Unknown keys are errors. Returns the
/// variables it set. Must run before the command line is parsed and before any thread starts.
pub fn apply_config_file(path: &std::path::Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("config file {} is not valid TOML: {e}", path.display()))?;
    // File keys are the flag names with underscores: `batch_interval`, not the env name's `_MS`.
    let by_key: std::collections::BTreeMap<String, String> = known_settings()
        .into_iter()
        .filter(|(_, flag)| flag != "config")
        .map(|(env, flag)| (flag.replace('-', "_"), env))
        .collect();
    let mut set = Vec::new();
    for (key, value) in table {
        let Some(env) = by_key.get(&key.replace('-', "_")).cloned() else {
            let valid: Vec<&str> = by_key.keys().map(String::as_str).collect();
            return Err(format!(
                "config file {}: unknown key {key:?}; known keys: {}",
                path.display(),
                valid.join(", ")
            ));
        };
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(i) => i.to_string(),
                    other => format!("{other:?}"),
                })
                .collect::<Vec<_>>()
                .join(","),
            other => {
                return Err(format!(
                    "config file {}: key {key:?} has an unsupported value {other:?}",
                    path.display()
                ))
            }
        };
        if std::env::var_os(&env).is_none() {
            // Single-threaded at this point (called from main before the runtime starts).
            std::env::set_var(&env, text);
            set.push(env);
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    /// A config file key is a flag name: a flag that read two variables (in two commands) would
    /// have the key set only one of them (verify's --metrics-addr once shadowed the stream's).
    #[test]
    fn each_flag_reads_one_variable() {
        let mut by_flag = std::collections::BTreeMap::new();
        for (env, flag) in super::known_settings() {
            if let Some(other) = by_flag.insert(flag.clone(), env.clone()) {
                panic!("--{flag} reads both {other} and {env}");
            }
        }
    }

    use super::*;

    #[test]
    fn every_setting_has_an_env_name() {
        let known = known_settings();
        for k in [
            "CDC_RELAY_PG_URL",
            "CDC_RELAY_KAFKA_BROKERS",
            "CDC_RELAY_CLICKHOUSE_PASSWORD",
            "CDC_RELAY_OPS",
            "CDC_RELAY_GROUP",
        ] {
            assert!(known.contains_key(k), "{k}");
        }
    }
}
