//! The `sluice` binary: parses the command line and composes the crates. No
//! logic of its own lives here.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sluice_config::Snapshot;
use sluice_proxy::{Proxy, ProxyOptions};

#[cfg(feature = "mimalloc")]
mod alloc;
mod filter_cli;

// mimalloc: fewer cycles per allocation than glibc's malloc on the request path.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: alloc::MiMalloc = alloc::MiMalloc;

#[derive(Parser)]
#[command(name = "sluice", version, about = "A WebAssembly-extensible proxy and service mesh")]
struct Cli {
    /// Log filter directives (RUST_LOG syntax), e.g. `info,sluice_proxy=debug`.
    #[arg(long, global = true, env = "SLUICE_LOG", default_value = "info")]
    log: String,
    /// Log format.
    #[arg(long, global = true, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Proxy {
        /// The YAML config file (watched and hot-reloaded).
        #[arg(long, short)]
        config: PathBuf,
        /// Validate the config and exit: 0 when valid, 1 with the problems otherwise.
        #[arg(long)]
        check: bool,
        /// Folder for compiled-module caches (default: a `sluice-cache` folder in the system temp dir).
        #[arg(long, env = "SLUICE_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
        /// Keep filter VMs in wasmtime's pooling allocator (the default: fast VM starts).
        /// `false` allocates each VM's memory on demand instead: slower VM starts, but no
        /// up-front reservation of address space for the whole pool (for hosts that cap
        /// virtual memory, and for valgrind).
        #[arg(long, env = "SLUICE_WASM_POOLING", default_value_t = true, action = clap::ArgAction::Set)]
        wasm_pooling: bool,
    },
    /// Write and build filters: `sluice filter new NAME`, `sluice filter build`.
    Filter {
        #[command(subcommand)]
        cmd: filter_cli::FilterCmd,
    },
}

fn init_logging(filter: &str, format: &str) {
    let env = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(env).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, &cli.log_format);
    let result = match cli.command {
        Command::Proxy { config, check, cache_dir, wasm_pooling } => {
            run_proxy(config, check, cache_dir, wasm_pooling)
        }
        Command::Filter { cmd } => filter_cli::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_proxy(
    config: PathBuf,
    check: bool,
    cache_dir: Option<PathBuf>,
    wasm_pooling: bool,
) -> anyhow::Result<ExitCode> {
    let snapshot = match Snapshot::load(&config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sluice-main")
        .enable_all()
        .build()
        .context("cannot start the main runtime")?;
    rt.block_on(async move {
        let registry = prometheus::Registry::new();
        let callouts = sluice_proxy::callout::ClusterCallouts::new();
        let cache_dir = cache_dir.unwrap_or_else(|| std::env::temp_dir().join("sluice-cache"));
        let host = sluice_wasm::WasmHost::new(
            sluice_wasm::HostOptions {
                cache_dir: Some(cache_dir),
                pooling: wasm_pooling,
                ..Default::default()
            },
            &registry,
            callouts.clone(),
        )
        .context("cannot start the wasm host")?;
        let loader: Option<Arc<dyn sluice_filter::FilterLoader>> = Some(Arc::new(host));
        if check {
            // A full check builds everything a start would (filters included) without binding.
            return match sluice_proxy::dataplane::Dataplane::build(
                snapshot,
                0,
                None,
                loader.as_deref(),
                &sluice_proxy::metrics::Metrics::new(registry)?,
            ) {
                Ok(_) => {
                    println!("{}: ok", config.display());
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("{e}");
                    Ok(ExitCode::FAILURE)
                }
            };
        }
        // Watch before starting, so an edit made while the proxy starts is not missed.
        let (_watch, mut updates) =
            sluice_proxy::source::watch_file(&config).context("cannot watch the config file")?;
        let proxy =
            Proxy::start(snapshot, ProxyOptions { registry, loader, callouts: Some(callouts) }).await?;
        let proxy = Arc::new(proxy);
        if let Some(a) = proxy.admin_addr() {
            tracing::info!(address = %a, "admin listening");
        }
        let reloader = proxy.clone();
        tokio::spawn(async move {
            while let Some(update) = updates.recv().await {
                match update {
                    Ok(snapshot) => {
                        if let Err(e) = reloader.reload(snapshot).await {
                            tracing::error!(error = %e, "config rejected; the previous config keeps serving");
                        }
                    }
                    Err(e) => {
                        reloader.metrics().reloads.with_label_values(&["failed"]).inc();
                        tracing::error!(error = %e, "config rejected; the previous config keeps serving");
                    }
                }
            }
        });
        wait_for_signal().await;
        let timeout = proxy.drain_timeout();
        tracing::info!(timeout = ?timeout, "draining");
        proxy.drain(timeout).await;
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
