//! `herald.toml`: the lowest layer of configuration.
//!
//! Precedence is defaults < `herald.toml` < environment (`HERALD_…`) <
//! flags. The file is read before the command line is parsed, and each of
//! its keys that the environment does not already set becomes the matching
//! `HERALD_…` variable, so clap applies one set of rules (and one set of
//! checks) to every layer.
//!
//! Keys are the long flag names with `_` or `-` (`addr`, `database_url`,
//! `in_flight`, …). An unknown key or a value that is not a string, number
//! or boolean refuses to start, naming the key.

use std::path::Path;

/// `(file key, environment variable)` for every setting a file may hold.
pub const KEYS: &[(&str, &str)] = &[
    ("addr", "HERALD_ADDR"),
    ("database_url", "HERALD_DATABASE_URL"),
    ("database_pool_size", "HERALD_DATABASE_POOL_SIZE"),
    (
        "database_statement_timeout_ms",
        "HERALD_DATABASE_STATEMENT_TIMEOUT_MS",
    ),
    ("no_migrate", "HERALD_NO_MIGRATE"),
    ("log_format", "HERALD_LOG_FORMAT"),
    ("otlp_endpoint", "HERALD_OTLP_ENDPOINT"),
    ("max_body_bytes", "HERALD_MAX_BODY_BYTES"),
    ("max_import_bytes", "HERALD_MAX_IMPORT_BYTES"),
    ("default_region", "HERALD_DEFAULT_REGION"),
    ("no_demo", "HERALD_NO_DEMO"),
    ("no_engine", "HERALD_NO_ENGINE"),
    ("public_url", "HERALD_PUBLIC_URL"),
    ("coalesce_ms", "HERALD_COALESCE_MS"),
    ("ws_idle_seconds", "HERALD_WS_IDLE_SECONDS"),
    ("ws_max_per_key", "HERALD_WS_MAX_PER_KEY"),
    ("ws_messages_per_second", "HERALD_WS_MESSAGES_PER_SECOND"),
    ("rate_limit", "HERALD_RATE_LIMIT"),
    ("cors_origins", "HERALD_CORS_ORIGINS"),
    ("event_retention_hours", "HERALD_EVENT_RETENTION_HOURS"),
    ("event_retention_count", "HERALD_EVENT_RETENTION_COUNT"),
    (
        "execution_retention_days",
        "HERALD_EXECUTION_RETENTION_DAYS",
    ),
    ("metrics_retention_days", "HERALD_METRICS_RETENTION_DAYS"),
    ("in_flight", "HERALD_IN_FLIGHT"),
    ("max_runs", "HERALD_MAX_RUNS"),
    ("tasks_per_run", "HERALD_TASKS_PER_RUN"),
    ("lease_seconds", "HERALD_LEASE_SECONDS"),
    ("retry_base_ms", "HERALD_RETRY_BASE_MS"),
    ("drain_seconds", "HERALD_DRAIN_SECONDS"),
    ("slice", "HERALD_SLICE"),
    ("sender_rate", "HERALD_SENDER_RATE"),
];

/// The file named by `--config`/`HERALD_CONFIG`, or `./herald.toml` if present.
pub fn locate(args: &[String]) -> Option<std::path::PathBuf> {
    let flag = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let inline = args
        .iter()
        .find_map(|a| a.strip_prefix("--config=").map(str::to_owned));
    if let Some(path) = flag
        .or(inline)
        .or_else(|| std::env::var("HERALD_CONFIG").ok())
    {
        return Some(path.into());
    }
    let default = Path::new("herald.toml");
    default.exists().then(|| default.to_path_buf())
}

/// Reads a file into `(environment variable, value)` pairs.
pub fn read(path: &Path) -> Result<Vec<(&'static str, String)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("{} is not valid TOML: {e}", path.display()))?;
    let mut pairs = Vec::new();
    for (key, value) in table {
        let normalised = key.replace('-', "_");
        let Some((_, env)) = KEYS.iter().find(|(k, _)| *k == normalised) else {
            let known: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
            return Err(format!(
                "unknown key '{key}' in {}; known keys: {}",
                path.display(),
                known.join(", ")
            ));
        };
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().map(str::to_owned).ok_or(()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|()| format!("'{key}' must be a list of strings"))?
                .join(","),
            other => return Err(format!("'{key}' has an unsupported value {other}")),
        };
        pairs.push((*env, value));
    }
    Ok(pairs)
}

/// Applies a file under the environment: a variable already set wins.
pub fn apply(pairs: Vec<(&'static str, String)>) {
    for (env, value) in pairs {
        if std::env::var_os(env).is_none() {
            // Called from `cli::prepare`, before the runtime starts any thread.
            std::env::set_var(env, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_known_keys_and_refuses_unknown_ones() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(&good, "addr = \"0.0.0.0:9000\"\nin-flight = 64\nno_demo = true\ncors_origins = [\"https://a\", \"https://b\"]\n").unwrap();
        let pairs = read(&good).unwrap();
        assert!(pairs.contains(&("HERALD_ADDR", "0.0.0.0:9000".into())));
        assert!(pairs.contains(&("HERALD_IN_FLIGHT", "64".into())));
        assert!(pairs.contains(&("HERALD_NO_DEMO", "true".into())));
        assert!(pairs.contains(&("HERALD_CORS_ORIGINS", "https://a,https://b".into())));
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "adress = \"x\"\n").unwrap();
        assert!(read(&bad).unwrap_err().contains("unknown key 'adress'"));
        std::fs::write(&bad, "addr = [1, 2]\n").unwrap();
        assert!(read(&bad).unwrap_err().contains("'addr'"));
        std::fs::write(&bad, "addr = \n").unwrap();
        assert!(read(&bad).unwrap_err().contains("not valid TOML"));
    }
}
