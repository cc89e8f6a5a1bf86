//! Command line: `serve` (the default), `migrate`, `rebuild`, `reconcile`, `check-config`.
//!
//! Invariants kept here: configuration problems end the process with exit status 64 and a
//! message naming the bad key, before anything is started or changed; no message this
//! module prints or logs carries a secret (tokens and URL passwords are redacted, see
//! [`crate::secret`]); and a reader that closes our stdout early (`claimgate check-config |
//! head -1`) ends the output quietly: no panic, the command's own exit status (0 for
//! `check-config`), nothing on stderr. Status 0 rather than 141 (a SIGPIPE death) because
//! whether a short output is written before the reader exits is a race: the status must
//! not depend on it.

use std::io::{ErrorKind, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::backend::Backend;
use crate::backend::embedded::EmbeddedBackend;
use crate::backend::redis::RedisBackend;
use crate::config::secret::{redact_text, redact_url};
use crate::config::{BackendKind, Config};

/// EX_USAGE: bad configuration or arguments.
pub const EXIT_CONFIG: u8 = 64;
/// EX_UNAVAILABLE: a required service (Redis, the database) cannot be used.
pub const EXIT_UNAVAILABLE: u8 = 69;
/// EX_IOERR: standard output could not be written (other than a closed pipe).
pub const EXIT_IOERR: u8 = 74;

/// Writes `text` to stdout. `Ok(false)` when the reader has gone (EPIPE): stop printing
/// and exit as if it had all been read.
fn emit(text: &str) -> std::io::Result<bool> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e),
    }
}

/// A line of a command's report on stdout; a closed pipe is ignored, another write error
/// is said on stderr (the command's exit status stays what its work decided).
fn say(line: &str) {
    if let Err(e) = emit(&format!("{line}\n")) {
        eprintln!("claimgate: cannot write to stdout: {e}");
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "claimgate",
    version,
    about = "Redis-native coupon claim gateway"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Args, Clone, Default)]
pub struct Common {
    /// Config file (TOML). Without it, built-in defaults (embedded backend, SQLite).
    #[arg(long, global = true, env = "CLAIMGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// `embedded` or `redis`.
    #[arg(long, global = true)]
    pub backend: Option<String>,
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long, global = true)]
    pub listen: Option<String>,
    /// Redis URL (redis backend).
    #[arg(long, global = true)]
    pub redis_url: Option<String>,
    /// Database URL: postgres://… or sqlite://path?mode=rwc.
    #[arg(long, global = true)]
    pub database_url: Option<String>,
    /// Any setting, as section.key=value (repeatable), e.g. --set stock.refill_divisor=4.
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Restore a batch's Redis state from the database (after Redis lost its data).
    Rebuild {
        #[arg(long)]
        batch: String,
        /// Rebuild even though Redis still has the batch.
        #[arg(long)]
        force: bool,
    },
    /// Compare Redis and the database; exit status 1 when they disagree.
    Reconcile {
        #[arg(long)]
        batch: Option<String>,
    },
    /// Load and check the configuration, print it, and exit.
    CheckConfig,
}

impl Common {
    fn overrides(&self) -> Vec<String> {
        let mut o = Vec::new();
        if let Some(b) = &self.backend {
            o.push(format!("backend=\"{b}\""));
        }
        if let Some(l) = &self.listen {
            o.push(format!("server.listen=\"{l}\""));
        }
        if let Some(u) = &self.redis_url {
            o.push(format!("redis.url=\"{u}\""));
        }
        if let Some(u) = &self.database_url {
            o.push(format!("database.url=\"{u}\""));
        }
        o.extend(self.set.iter().cloned());
        o
    }

    pub fn load(&self) -> Result<Config, crate::config::ConfigError> {
        crate::config::load(self.config.as_deref(), std::env::vars(), &self.overrides())
    }
}

fn init_tracing(cfg: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&cfg.log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = if cfg.log.json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match cli.common.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("claimgate: {}", redact_text(&e.to_string()));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_tracing(&cfg);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("claimgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli.command.unwrap_or(Command::Serve), cfg))
}

/// `check-config`: the effective configuration as TOML, secrets redacted
/// ([`Config::to_toml`]); the output loads again with `--config` once secrets are given.
fn check_config(cfg: &Config) -> ExitCode {
    let text = match cfg.to_toml() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("claimgate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match emit(&text) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("claimgate: cannot write to stdout: {e}");
            ExitCode::from(EXIT_IOERR)
        }
    }
}

async fn run(cmd: Command, cfg: Config) -> ExitCode {
    match cmd {
        Command::CheckConfig => check_config(&cfg),
        Command::Serve => serve(cfg).await,
        cmd => {
            let cfg = Arc::new(cfg);
            match cfg.backend {
                BackendKind::Embedded => match EmbeddedBackend::open(&cfg.embedded) {
                    Ok(b) => operate(cmd, cfg, Arc::new(b)).await,
                    Err(e) => fail(&cfg, format!("embedded backend: {e}")),
                },
                BackendKind::Redis => match RedisBackend::connect(&cfg.redis).await {
                    Ok(b) => operate(cmd, cfg, Arc::new(b)).await,
                    Err(e) => fail(
                        &cfg,
                        format!("redis at {}: {e}", redact_url(&cfg.redis.url)),
                    ),
                },
            }
        }
    }
}

/// Logs and prints `msg` with every secret of `cfg` and every URL password redacted
/// (library errors may quote a URL), and returns EX_UNAVAILABLE.
fn fail(cfg: &Config, msg: String) -> ExitCode {
    let msg = cfg.scrub(&msg);
    tracing::error!("{msg}");
    eprintln!("claimgate: {msg}");
    ExitCode::from(EXIT_UNAVAILABLE)
}

/// The operator commands: `migrate`, `rebuild`, `reconcile`.
async fn operate<B: Backend>(cmd: Command, cfg: Arc<Config>, backend: Arc<B>) -> ExitCode {
    let db = match crate::gateway::open_store(&cfg).await {
        Ok(db) => db,
        Err(e) => return fail(&cfg, e.to_string()),
    };
    match cmd {
        Command::Migrate | Command::CheckConfig | Command::Serve => {
            say(&format!("migrations applied ({})", db.kind()));
            ExitCode::SUCCESS
        }
        Command::Rebuild { batch, force } => {
            match crate::recovery::rebuild(backend.as_ref(), &db, &batch, force).await {
                Ok(report) => {
                    say(&report.to_string());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&cfg, format!("rebuild of {batch}: {e}")),
            }
        }
        Command::Reconcile { batch } => {
            match crate::recovery::reconcile(backend.as_ref(), &db, batch.as_deref()).await {
                Ok(diffs) if diffs.is_empty() => {
                    say("Redis and the database agree");
                    ExitCode::SUCCESS
                }
                Ok(diffs) => {
                    let mut text: String = diffs.iter().map(|d| format!("{d}\n")).collect();
                    text.push_str(&format!("{} difference(s)", diffs.len()));
                    say(&text);
                    ExitCode::FAILURE
                }
                Err(e) => fail(&cfg, format!("reconcile: {e}")),
            }
        }
    }
}

/// Waits for SIGTERM or SIGINT.
async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// `serve`: the gateway of the composition root, until SIGTERM or SIGINT.
async fn serve(cfg: Config) -> ExitCode {
    let scrub = cfg.clone();
    let gateway = match crate::gateway::start(cfg).await {
        Ok(g) => g,
        Err(e) => return fail(&scrub, e.to_string()),
    };
    let stop = gateway.shutdown_token();
    tokio::spawn(async move {
        signal().await;
        tracing::info!("shutdown requested");
        stop.cancel();
    });
    gateway.run().await;
    ExitCode::SUCCESS
}
