//! The `omnistage` command line: serve a stage graph, check a deployment file, make tiny
//! checkpoints.

use clap::{Parser, Subcommand};
use omnistage::app::{load_deployment_with_source, ServeOptions, Server};
use omnistage::runtime::ExecutionMode;
use omnistage::worker::WorkerOptions;
use omnistage_stages::deploy::DeployGraph;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "omnistage",
    version,
    about = "Serve any-to-any multimodal models as a graph of batched stages"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a deployment over an OpenAI-compatible HTTP API (no file: the embedded tiny default).
    Serve {
        /// Deployment TOML; omitted = the embedded default (deploy/tiny-omni.toml).
        deploy: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Per-request deadline in seconds.
        #[arg(long, default_value_t = 600)]
        request_timeout: u64,
        /// Baseline mode: one request at a time through the graph, every stage unbatched (what a
        /// single sequential Transformers/Diffusers pipeline gives), for JCT comparisons.
        #[arg(long)]
        monolithic: bool,
    },
    /// Run one replica of one stage in its own process: a child of `serve` for `process = true`
    /// stages (`--socket`, started by the gateway), or a remote worker for `remote = true`
    /// stages (`--listen`: accepts gateways on TCP and registers in the deployment's [cluster]
    /// etcd).
    Worker {
        /// The deployment file (the gateway writes the one it loaded).
        #[arg(long)]
        deploy: PathBuf,
        /// Folder relative model paths resolve against (default: the deployment file's folder).
        #[arg(long)]
        base_dir: Option<PathBuf>,
        /// The stage to run.
        #[arg(long)]
        stage: String,
        #[arg(long, default_value_t = 0)]
        replica: usize,
        /// The gateway's Unix socket to connect to (child workers).
        #[arg(long, conflicts_with = "listen")]
        socket: Option<PathBuf>,
        /// Accept gateways on this TCP address, e.g. 0.0.0.0:7100 (remote workers).
        #[arg(long)]
        listen: Option<String>,
        /// The address gateways reach this worker at, registered in etcd (default: the bound
        /// --listen address).
        #[arg(long)]
        advertise: Option<String>,
        /// This worker's name in etcd (default: HOSTNAME-PID).
        #[arg(long)]
        instance: Option<String>,
        /// Serve /health and /metrics on this address (remote workers).
        #[arg(long)]
        http: Option<String>,
        /// The stage as monolithic mode runs it.
        #[arg(long)]
        monolithic: bool,
    },
    /// Validate a deployment file and print its graph as text and Graphviz DOT.
    Check {
        file: PathBuf,
        /// Skip checking that model directories exist.
        #[arg(long)]
        no_models: bool,
    },
    /// Load-test a running server and report job completion time (JCT) per request kind, with
    /// the server's per-stage breakdown; `bench plot` compares sweeps.
    Bench(Box<omnistage::bench::BenchArgs>),
    /// Write seeded random-weight checkpoints in the real Hugging Face layouts.
    MakeTiny {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Instead of the tiny default set, write one ~100M-parameter benchmark LLM of this
        /// family (llama, qwen2 or qwen3) into OUT.
        #[arg(long, value_parser = ["llama", "qwen2", "qwen3"], conflicts_with = "mot")]
        bench_llm: Option<String>,
        /// Instead of the tiny default set, write the tiny Mixture-of-Thoughts set (three
        /// experts, interaction weights, router) into OUT/tiny-mot, as deploy/tiny-mot.toml
        /// expects.
        #[arg(long)]
        mot: bool,
        /// With --mot: `bench` writes larger experts (Llama 256 × 4, Qwen2 384 × 6, Qwen3
        /// 512 × 8; shared space 128) for `scripts/bench-mot.sh`.
        #[arg(long, value_parser = ["tiny", "bench"], default_value = "tiny", requires = "mot")]
        mot_set: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            deploy,
            host,
            port,
            request_timeout,
            monolithic,
        } => serve(deploy, host, port, request_timeout, monolithic),
        Command::Worker {
            deploy,
            base_dir,
            stage,
            replica,
            socket,
            listen,
            advertise,
            instance,
            http,
            monolithic,
        } => omnistage::worker::child::run(omnistage::worker::child::WorkerArgs {
            deploy,
            base_dir,
            stage,
            replica,
            socket,
            listen,
            advertise,
            instance,
            http,
            monolithic,
        }),
        Command::Check { file, no_models } => check(file, no_models),
        Command::Bench(args) => bench(*args),
        Command::MakeTiny {
            out,
            seed,
            bench_llm,
            mot,
            mot_set,
        } => make_tiny(
            &out,
            seed,
            bench_llm.as_deref(),
            mot.then_some(mot_set.as_str()),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn make_tiny(
    out: &std::path::Path,
    seed: u64,
    bench_llm: Option<&str>,
    mot: Option<&str>,
) -> Result<(), String> {
    use omnistage_engines::tiny::{MotSetSpec, TinyFamily, TinyLlmSpec};
    if let Some(set) = mot {
        let set = match set {
            "bench" => MotSetSpec::bench(),
            _ => MotSetSpec::tiny(),
        };
        let files = omnistage_engines::tiny::write_mot_set(&out.join("tiny-mot"), &set, seed)
            .map_err(|e| e.to_string())?;
        for f in files {
            println!("{}", f.display());
        }
        return Ok(());
    }
    let Some(family) = bench_llm else {
        let manifest = omnistage_engines::tiny::make_tiny(out, seed).map_err(|e| e.to_string())?;
        for f in manifest.files() {
            println!("{}", f.display());
        }
        return Ok(());
    };
    let family = match family {
        "llama" => TinyFamily::Llama,
        "qwen2" => TinyFamily::Qwen2,
        _ => TinyFamily::Qwen3,
    };
    let spec = TinyLlmSpec::bench_100m(family);
    omnistage_engines::tiny::write_tiny_llm(out, &spec, seed).map_err(|e| e.to_string())?;
    println!("{}", out.display());
    Ok(())
}

fn bench(args: omnistage::bench::BenchArgs) -> Result<(), String> {
    omnistage::bench::main(args)
}

fn check(file: PathBuf, no_models: bool) -> Result<(), String> {
    let graph = DeployGraph::load(&file).map_err(|e| e.to_string())?;
    if !no_models {
        graph.check_models().map_err(|e| e.to_string())?;
    }
    println!("{}", graph.to_text());
    println!("{}", graph.to_dot());
    Ok(())
}

fn serve(
    deploy: Option<PathBuf>,
    host: String,
    port: u16,
    request_timeout: u64,
    monolithic: bool,
) -> Result<(), String> {
    let addr: SocketAddr = format!("{host}:{port}")
        .parse()
        .map_err(|e| format!("bad --host/--port `{host}:{port}`: {e}"))?;
    let (graph, source) =
        load_deployment_with_source(deploy.as_deref()).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let options = ServeOptions {
            addr,
            request_timeout: Duration::from_secs(request_timeout),
        };
        let mode = if monolithic {
            ExecutionMode::Monolithic
        } else {
            ExecutionMode::Pipelined
        };
        let workers = WorkerOptions {
            exe: None,
            source: Some(source),
        };
        let server = Server::start_with_workers(graph, options, mode, workers)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!("omnistage listening on http://{} ({mode:?})", server.addr);
        server.run().await.map_err(|e| e.to_string())
    })
}
