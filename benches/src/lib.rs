//! Shared pieces of omnistage's benchmarks (`cargo bench -p omnistage-benches`; see README.md).

use omnistage::app::{ServeOptions, Server};
use omnistage_stages::deploy::DeployGraph;
use std::path::Path;
use std::time::Duration;

/// Serves one LLM stage over `model` on a free loopback port and waits until it is loaded.
/// `stage_settings` are extra TOML lines for the stage (batching limits, KV settings).
pub async fn serve_llm(model: &Path, stage_settings: &str) -> Server {
    let toml = format!(
        "name = \"bench\"\n[[stage]]\nid = \"llm\"\nkind = \"llm\"\nmodel = \"{}\"\n{stage_settings}\n[outputs]\ntext = \"llm\"\n",
        model.display()
    );
    let graph = DeployGraph::from_toml_str(&toml, Path::new("bench.toml"), Path::new("."), &[])
        .expect("benchmark graph");
    let options = ServeOptions {
        addr: "127.0.0.1:0".parse().expect("loopback address"),
        request_timeout: Duration::from_secs(3600),
    };
    let server = Server::start(graph, options).await.expect("server starts");
    server
        .wait_ready(Duration::from_secs(600))
        .await
        .expect("stage loads");
    server
}
