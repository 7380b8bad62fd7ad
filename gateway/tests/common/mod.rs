//! A real server on a loopback port, serving tiny checkpoints made for the test.

#![allow(dead_code)]

use omnistage::app::{ServeOptions, Server};
use omnistage::runtime::ExecutionMode;
use omnistage::worker::{DeploySource, WorkerOptions};
use omnistage_stages::deploy::DeployGraph;
use std::path::Path;
use std::time::Duration;

pub struct TestServer {
    pub server: Server,
    pub base: String,
    pub client: reqwest::Client,
    _models: tempfile::TempDir,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A one-stage text graph over the tiny thinker; `stage_extra` adds TOML lines to the stage.
pub fn single_stage_toml(stage_extra: &str) -> String {
    format!(
        r#"
name = "tiny-test"
[[stage]]
id = "thinker"
kind = "llm"
model = "tiny-omni/thinker"
{stage_extra}
[outputs]
text = "thinker"
"#
    )
}

pub async fn start(toml: &str) -> TestServer {
    start_with_timeout(toml, Duration::from_secs(120)).await
}

pub async fn start_with_timeout(toml: &str, request_timeout: Duration) -> TestServer {
    start_with(toml, request_timeout, ExecutionMode::Pipelined).await
}

pub async fn start_with(toml: &str, request_timeout: Duration, mode: ExecutionMode) -> TestServer {
    start_with_env(toml, request_timeout, mode, &[]).await
}

/// Like [`start_with`], with `OMNISTAGE_*` deployment overrides applied to the TOML.
pub async fn start_with_env(
    toml: &str,
    request_timeout: Duration,
    mode: ExecutionMode,
    env: &[(String, String)],
) -> TestServer {
    start_with_models(toml, request_timeout, mode, env, |dir| {
        omnistage_engines::tiny::make_tiny(dir, 0).expect("make tiny checkpoints");
    })
    .await
}

/// Like [`start_with_env`], with the checkpoints `make` writes into the models folder (relative
/// `model` paths resolve against it).
pub async fn start_with_models(
    toml: &str,
    request_timeout: Duration,
    mode: ExecutionMode,
    env: &[(String, String)],
    make: impl FnOnce(&Path),
) -> TestServer {
    let models = tempfile::tempdir().expect("temp dir");
    make(models.path());
    let graph = DeployGraph::from_toml_str(toml, Path::new("test.toml"), models.path(), env)
        .expect("valid graph");
    graph.check_models().expect("models present");
    let options = ServeOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        request_timeout,
    };
    // `process = true` stages run in `omnistage worker` processes of the binary under test.
    let workers = WorkerOptions {
        exe: Some(env!("CARGO_BIN_EXE_omnistage").into()),
        source: Some(DeploySource {
            toml: toml.to_string(),
            base_dir: models.path().to_path_buf(),
            env: env.to_vec(),
        }),
    };
    let server = Server::start_with_workers(graph, options, mode, workers)
        .await
        .expect("server starts");
    server
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("stages load");
    let base = format!("http://{}", server.addr);
    TestServer {
        server,
        base,
        // No pooled connections: a server may close one after an error answer (a 413 for an
        // oversized body), and a request reusing it would fail with an incomplete message.
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("http client"),
        _models: models,
    }
}

impl TestServer {
    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .expect("request sent");
        let status = resp.status().as_u16();
        let json = resp.json().await.unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    /// Posts and returns the status, the `x-omnistage-request-id` header and the JSON body.
    pub async fn post_with_id(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, Option<u64>, serde_json::Value) {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .expect("request sent");
        let status = resp.status().as_u16();
        let id = resp
            .headers()
            .get("x-omnistage-request-id")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let json = resp.json().await.unwrap_or(serde_json::Value::Null);
        (status, id, json)
    }

    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let resp = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request sent");
        (
            resp.status().as_u16(),
            resp.text().await.unwrap_or_default(),
        )
    }

    /// Sends a streaming request and returns every `data:` payload, `[DONE]` included.
    pub async fn stream(&self, path: &str, body: serde_json::Value) -> Vec<String> {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .expect("request sent");
        assert_eq!(resp.status().as_u16(), 200);
        let text = resp.text().await.expect("stream body");
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }

    /// Value of a metric line (exact series match, e.g. `name{label="x"}`), summed over matches
    /// whose series starts with `prefix`.
    pub async fn metric_sum(&self, prefix: &str) -> f64 {
        let (_, text) = self.get_text("/metrics").await;
        text.lines()
            .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// A chat request body asking for exactly `n` tokens.
pub fn chat_body(content: &str, n: usize, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "tiny-test",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": n,
        "temperature": 0,
        "ignore_eos": true,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}
