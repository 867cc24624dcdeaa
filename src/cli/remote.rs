//! Commands that talk to a running Herald over its public API, so an
//! operator never needs curl: `campaign …`, `contacts import`, `watch`.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

/// Where the server is and which key to use.
#[derive(Debug, Args, Clone)]
pub struct Remote {
    /// Base URL of a running Herald.
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// API key (see `herald keys create`).
    #[arg(long, env = "HERALD_KEY", hide_env_values = true)]
    pub key: String,
}

#[derive(Debug, Subcommand)]
pub enum CampaignCommand {
    /// Create a campaign; prints it as JSON.
    Create {
        #[arg(long)]
        name: String,
        /// sms, voice or external.
        #[arg(long, default_value = "sms")]
        channel: String,
        /// Message with {{variables}}.
        #[arg(long)]
        template: Option<String>,
        /// E.164 number or SMS sender id.
        #[arg(long)]
        sender: Option<String>,
        /// Provider settings as JSON, e.g. '{"kind":"simulated","latency_ms":20}'.
        #[arg(long)]
        provider: Option<String>,
        #[arg(long)]
        max_attempts: Option<u8>,
    },
    /// List campaigns, newest first.
    List {
        #[arg(long, default_value_t = 1)]
        page: u32,
    },
    /// Show one campaign (id or uuid) as JSON, with its live counters.
    Show {
        campaign: String,
    },
    /// Start a draft or scheduled campaign now.
    Start {
        campaign: String,
    },
    Pause {
        campaign: String,
    },
    Resume {
        campaign: String,
    },
    Cancel {
        campaign: String,
    },
}

pub struct Client {
    http: reqwest::Client,
    remote: Remote,
}

/// Turns an error answer into a one-line message naming the field.
async fn checked(response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        return Ok(body);
    }
    let error = &body["error"];
    let message = error["message"].as_str().unwrap_or("request failed");
    match error["field"].as_str() {
        Some(field) => bail!("{status}: {message} (field: {field})"),
        None => bail!("{status}: {message}"),
    }
}

impl Client {
    pub fn new(remote: Remote) -> Self {
        Self {
            http: reqwest::Client::new(),
            remote,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.remote.url.trim_end_matches('/'))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.remote.key)
            .send()
            .await
            .with_context(|| format!("cannot reach Herald at {}", self.remote.url))?;
        checked(response).await
    }

    pub async fn post(&self, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut request = self.http.post(self.url(path)).bearer_auth(&self.remote.key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach Herald at {}", self.remote.url))?;
        checked(response).await
    }
}

pub async fn campaign(remote: Remote, command: CampaignCommand) -> anyhow::Result<()> {
    let client = Client::new(remote);
    let out = match command {
        CampaignCommand::Create {
            name,
            channel,
            template,
            sender,
            provider,
            max_attempts,
        } => {
            let mut body = json!({"name": name, "channel": channel});
            if let Some(t) = template {
                body["template"] = json!(t);
            }
            if let Some(s) = sender {
                body["sender"] = json!(s);
            }
            if let Some(p) = provider {
                body["provider"] =
                    serde_json::from_str(&p).context("--provider must be a JSON object")?;
            }
            if let Some(m) = max_attempts {
                body["max_attempts"] = json!(m);
            }
            client.post("/v1/campaigns", Some(body)).await?
        }
        CampaignCommand::List { page } => {
            let list = client.get(&format!("/v1/campaigns?page={page}")).await?;
            println!(
                "{:<6} {:<10} {:<8} {:>9} {:>9} {:>9}  NAME",
                "ID", "STATUS", "CHANNEL", "CONTACTS", "SENT", "FAILED"
            );
            for c in list["campaigns"].as_array().into_iter().flatten() {
                println!(
                    "{:<6} {:<10} {:<8} {:>9} {:>9} {:>9}  {}",
                    c["id"].to_string(),
                    c["status"].as_str().unwrap_or(""),
                    c["channel"].as_str().unwrap_or(""),
                    c["contact_count"].to_string(),
                    c["progress"]["sent"].to_string(),
                    c["progress"]["failed"].to_string(),
                    c["name"].as_str().unwrap_or("")
                );
            }
            let p = &list["pagination"];
            println!(
                "page {} of {} ({} campaigns)",
                p["page"], p["total_pages"], p["total_items"]
            );
            return Ok(());
        }
        CampaignCommand::Show { campaign } => {
            client.get(&format!("/v1/campaigns/{campaign}")).await?
        }
        CampaignCommand::Start { campaign } => {
            client
                .post(&format!("/v1/campaigns/{campaign}/start"), None)
                .await?
        }
        CampaignCommand::Pause { campaign } => {
            client
                .post(&format!("/v1/campaigns/{campaign}/pause"), None)
                .await?
        }
        CampaignCommand::Resume { campaign } => {
            client
                .post(&format!("/v1/campaigns/{campaign}/resume"), None)
                .await?
        }
        CampaignCommand::Cancel { campaign } => {
            client
                .post(&format!("/v1/campaigns/{campaign}/cancel"), None)
                .await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// Uploads a CSV with a progress bar; prints the counts and each bad row.
pub async fn import(
    remote: Remote,
    campaign: String,
    file: std::path::PathBuf,
) -> anyhow::Result<()> {
    let client = Client::new(remote);
    let handle = tokio::fs::File::open(&file)
        .await
        .with_context(|| format!("cannot open {}", file.display()))?;
    let size = handle.metadata().await?.len();
    let bar = ProgressBar::new(size).with_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            .expect("valid template"),
    );
    let progress = bar.clone();
    let stream = tokio_util::io::ReaderStream::new(handle).inspect(move |chunk| {
        if let Ok(bytes) = chunk {
            progress.inc(bytes.len() as u64);
        }
    });
    use futures::StreamExt as _;
    let response = client
        .http
        .post(client.url(&format!("/v1/campaigns/{campaign}/contacts:import")))
        .bearer_auth(&client.remote.key)
        .header("content-type", "text/csv")
        .header("content-length", size)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .with_context(|| format!("cannot reach Herald at {}", client.remote.url))?;
    bar.finish_and_clear();
    let report = checked(response).await?;
    println!(
        "imported {}, duplicates {}, invalid {}",
        report["imported"], report["duplicates"], report["invalid"]
    );
    for error in report["errors"].as_array().into_iter().flatten() {
        println!(
            "line {}: {}: {}",
            error["line"],
            error["column"].as_str().unwrap_or(""),
            error["reason"].as_str().unwrap_or("")
        );
    }
    if report["errors_truncated"] == true {
        println!("(more invalid rows than listed)");
    }
    Ok(())
}
