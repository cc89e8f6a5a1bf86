//! Command line: `serve` (the default), `migrate`, `rebuild`, `reconcile`, `check-config`,
//! `completions`. Each command takes only its own flags (serve's may also come before the
//! command, as in `claimgate --listen ADDR`); `-c/--config` and `--set` go everywhere.
//!
//! Invariants kept here: configuration and usage problems end the process with exit status
//! 64 (EX_USAGE) and a message naming the bad key or flag, before anything is started or
//! changed (the exit statuses are listed in `--help`: [`EXIT_STATUS_HELP`]); every fatal
//! error is printed once, on stderr (as a log line when logging is on, else as
//! `claimgate: ...`); logs go to stderr, in colour only on a terminal (and never with
//! `NO_COLOR`), so stdout carries only a command's report; no message this module prints
//! or logs carries a secret (tokens and URL passwords are redacted, see
//! [`crate::config::secret`]); and a reader that closes our stdout early (`claimgate
//! check-config | head -1`) ends the output quietly: no panic, the command's own exit
//! status (0 for `check-config`), nothing on stderr. Status 0 rather than 141 (a SIGPIPE
//! death) because whether a short output is written before the reader exits is a race:
//! the status must not depend on it.

mod remote;

use std::io::{ErrorKind, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::backend::Backend;
use crate::backend::embedded::{EmbeddedBackend, EmbeddedError};
use crate::backend::redis::RedisBackend;
use crate::config::secret::{redact_text, redact_url};
use crate::config::{BackendKind, Config};
use crate::recovery::RebuildError;

/// `reconcile` found differences between the backend and the database.
pub const EXIT_DIFFERENCES: u8 = 1;
/// EX_USAGE: bad configuration or arguments.
pub const EXIT_CONFIG: u8 = 64;
/// EX_UNAVAILABLE: a required service (the backend, the database, the gateway at `--url`)
/// cannot be used.
pub const EXIT_UNAVAILABLE: u8 = 69;
/// EX_SOFTWARE: an internal error (the runtime could not start).
pub const EXIT_SOFTWARE: u8 = 70;
/// EX_IOERR: standard output could not be written (other than a closed pipe).
pub const EXIT_IOERR: u8 = 74;

/// The exit statuses, as `--help` lists them.
pub const EXIT_STATUS_HELP: &str = "\
Exit status:
  0   success (also when the reader of stdout went away early)
  1   reconcile: the backend and the database disagree (each difference is printed)
  64  usage or configuration error: a bad flag or setting (the key is named), an unknown
      batch, rebuild of a batch the backend still has without --force
  69  a required service is unavailable: the backend, the database, the gateway at --url,
      or an append-only file in use by a running gateway
  70  internal error
  74  stdout could not be written

Configuration, lowest precedence first: built-in defaults, the --config file,
DATABASE_URL / REDIS_URL / RUST_LOG, CLAIMGATE_<SECTION>__<KEY>, --set, the flags.";

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
    about = "Redis-native coupon claim gateway",
    long_about = "Redis-native coupon claim gateway.\n\nWithout a command, `serve`.",
    after_help = EXIT_STATUS_HELP
)]
pub struct Cli {
    /// Config file (TOML). Without it, built-in defaults (embedded backend, SQLite).
    #[arg(
        short = 'c',
        long,
        global = true,
        env = "CLAIMGATE_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,
    /// Any setting, as section.key=value (repeatable), e.g. --set stock.refill_divisor=4.
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// `serve`'s flags, also accepted before a command that takes them.
    #[command(flatten, next_help_heading = "Serve options (the default command)")]
    pub serve: ServeArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Where the backend and the database are.
#[derive(Debug, Args, Clone, Default)]
pub struct StoreArgs {
    /// Backend that runs the scripts: `embedded` (in-process) or `redis`.
    #[arg(long, value_name = "KIND", value_parser = ["embedded", "redis"])]
    pub backend: Option<String>,
    /// Redis URL (redis backend), e.g. redis://127.0.0.1:6379.
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Database URL: postgres://… or sqlite://path?mode=rwc.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
}

#[derive(Debug, Args, Clone, Default)]
pub struct ServeArgs {
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Args, Clone, Default)]
pub struct MigrateArgs {
    /// Database URL: postgres://… or sqlite://path?mode=rwc.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
}

#[derive(Debug, Args, Clone)]
pub struct RebuildArgs {
    /// The batch to restore (its id).
    #[arg(long, value_name = "ID")]
    pub batch: String,
    /// Rebuild even though the backend still has the batch (pause it first).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Args, Clone)]
pub struct ReconcileArgs {
    /// Only this batch (default: every batch in the database).
    #[arg(long, value_name = "ID")]
    pub batch: Option<String>,
    /// Ask the running gateway at this address (`GET /v1/admin/reconcile`, with
    /// auth.admin_token when configured) instead of opening the backend: the way to
    /// reconcile while an embedded gateway holds its append-only file.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// With --url: the longest wait for the gateway's answer, seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 120, requires = "url",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout_s: u64,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (the default).
    #[command(after_help = EXIT_STATUS_HELP)]
    Serve(ServeArgs),
    /// Apply database migrations and exit.
    #[command(after_help = EXIT_STATUS_HELP)]
    Migrate(MigrateArgs),
    /// Restore a batch's backend state from the database (after the backend lost it).
    #[command(after_help = EXIT_STATUS_HELP)]
    Rebuild(RebuildArgs),
    /// Compare the backend and the database; exit status 1 when they disagree.
    #[command(after_help = EXIT_STATUS_HELP)]
    Reconcile(ReconcileArgs),
    /// Load and check the configuration, print it (secrets redacted), and exit.
    #[command(after_help = EXIT_STATUS_HELP)]
    CheckConfig,
    /// Print a shell completion script, e.g. `claimgate completions bash > /etc/bash_completion.d/claimgate`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::Serve(_) => "serve",
            Command::Migrate(_) => "migrate",
            Command::Rebuild(_) => "rebuild",
            Command::Reconcile(_) => "reconcile",
            Command::CheckConfig => "check-config",
            Command::Completions { .. } => "completions",
        }
    }
}

/// `section.key=value` overrides of the dedicated flags.
fn store_overrides(s: &StoreArgs, o: &mut Vec<String>) {
    if let Some(b) = &s.backend {
        o.push(format!("backend=\"{b}\""));
    }
    if let Some(u) = &s.redis_url {
        o.push(format!("redis.url={}", toml_string(u)));
    }
    if let Some(u) = &s.database_url {
        o.push(format!("database.url={}", toml_string(u)));
    }
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The store flags given before the command, merged under the command's own.
fn merge_store(top: &StoreArgs, own: &StoreArgs) -> StoreArgs {
    StoreArgs {
        backend: own.backend.clone().or_else(|| top.backend.clone()),
        redis_url: own.redis_url.clone().or_else(|| top.redis_url.clone()),
        database_url: own
            .database_url
            .clone()
            .or_else(|| top.database_url.clone()),
    }
}

impl Cli {
    /// The command to run with every flag merged into it (serve's flags given before the
    /// command land in it), or a usage error naming a flag the command does not take.
    fn resolve(self) -> Result<(Command, Vec<String>), String> {
        let top = &self.serve;
        let command = self.command.unwrap_or(Command::Serve(ServeArgs::default()));
        let given: Vec<&str> = [
            ("--listen", top.listen.is_some()),
            ("--backend", top.store.backend.is_some()),
            ("--redis-url", top.store.redis_url.is_some()),
            ("--database-url", top.store.database_url.is_some()),
        ]
        .into_iter()
        .filter_map(|(f, on)| on.then_some(f))
        .collect();
        let takes: &[&str] = match &command {
            // check-config prints the configuration these flags make
            Command::Serve(_) | Command::CheckConfig => {
                &["--listen", "--backend", "--redis-url", "--database-url"]
            }
            Command::Migrate(_) => &["--database-url"],
            Command::Rebuild(_) | Command::Reconcile(_) => {
                &["--backend", "--redis-url", "--database-url"]
            }
            Command::Completions { .. } => &[],
        };
        if let Some(f) = given.iter().find(|f| !takes.contains(f)) {
            return Err(format!(
                "`{f}` is not an option of `{}` (see `claimgate {} --help`)",
                command.name(),
                command.name()
            ));
        }
        let mut o = Vec::new();
        let command = match command {
            Command::Serve(own) => {
                let store = merge_store(&top.store, &own.store);
                store_overrides(&store, &mut o);
                if let Some(l) = own.listen.as_ref().or(top.listen.as_ref()) {
                    o.push(format!("server.listen={}", toml_string(l)));
                }
                Command::Serve(ServeArgs {
                    listen: None,
                    store,
                })
            }
            Command::Migrate(own) => {
                if let Some(u) = own
                    .database_url
                    .as_ref()
                    .or(top.store.database_url.as_ref())
                {
                    o.push(format!("database.url={}", toml_string(u)));
                }
                Command::Migrate(own)
            }
            Command::Rebuild(mut own) => {
                own.store = merge_store(&top.store, &own.store);
                store_overrides(&own.store, &mut o);
                Command::Rebuild(own)
            }
            Command::Reconcile(mut own) => {
                own.store = merge_store(&top.store, &own.store);
                store_overrides(&own.store, &mut o);
                Command::Reconcile(own)
            }
            Command::CheckConfig => {
                store_overrides(&top.store, &mut o);
                if let Some(l) = &top.listen {
                    o.push(format!("server.listen={}", toml_string(l)));
                }
                Command::CheckConfig
            }
            c => c,
        };
        o.extend(self.set);
        Ok((command, o))
    }
}

/// The log subscriber: `log.level` (which `RUST_LOG` sets, see [`crate::config::load`]),
/// text or JSON, on stderr, coloured only on a terminal without `NO_COLOR`.
fn init_tracing(cfg: &Config) {
    use tracing_subscriber::EnvFilter;
    // Checked at load: a filter that does not parse never gets here.
    let filter = EnvFilter::builder()
        .parse(&cfg.log.level)
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false);
    let _ = if cfg.log.json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Whether log lines are coloured: only on a terminal, and never when `NO_COLOR` is set
/// to anything (<https://no-color.org>).
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return if usage {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS // --help, --version
            };
        }
    };
    let config_file = cli.config.clone();
    let (command, overrides) = match cli.resolve() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("claimgate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Command::Completions { shell } = command {
        return completions(shell);
    }
    let cfg = match crate::config::load(config_file.as_deref(), std::env::vars(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("claimgate: {}", redact_text(&e.to_string()));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Command::CheckConfig = command {
        return check_config(&cfg);
    }
    init_tracing(&cfg);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            return fail(
                &cfg,
                EXIT_SOFTWARE,
                format!("cannot start the runtime: {e}"),
            );
        }
    };
    runtime.block_on(run(command, cfg))
}

/// `completions`: the shell's completion script on stdout.
fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "claimgate", &mut buf);
    match emit(&String::from_utf8_lossy(&buf)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("claimgate: cannot write to stdout: {e}");
            ExitCode::from(EXIT_IOERR)
        }
    }
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
        Command::Serve(_) => serve(cfg).await,
        Command::Migrate(_) => match crate::gateway::open_store(&cfg).await {
            Ok(db) => {
                say(&format!("migrations applied ({})", db.kind()));
                db.close().await;
                ExitCode::SUCCESS
            }
            Err(e) => fail(&cfg, EXIT_UNAVAILABLE, e.to_string()),
        },
        Command::Reconcile(ReconcileArgs {
            url: Some(url),
            batch,
            timeout_s,
            ..
        }) => reconcile_remote(&cfg, &url, batch.as_deref(), timeout_s).await,
        cmd => {
            let cfg = Arc::new(cfg);
            match cfg.backend {
                BackendKind::Embedded => match EmbeddedBackend::open(&cfg.embedded) {
                    Ok(b) => operate(cmd, cfg, Arc::new(b)).await,
                    Err(e @ EmbeddedError::Locked { .. }) => {
                        let hint = match cmd {
                            Command::Reconcile(_) => {
                                "a gateway is running on it: ask it with `claimgate reconcile \
                                 --url http://<its server.listen>`"
                            }
                            _ => "a gateway is running on it: stop it first",
                        };
                        fail(
                            &cfg,
                            EXIT_UNAVAILABLE,
                            format!("embedded backend: {e}; {hint}"),
                        )
                    }
                    Err(e) => fail(&cfg, EXIT_UNAVAILABLE, format!("embedded backend: {e}")),
                },
                BackendKind::Redis => match RedisBackend::connect(&cfg.redis).await {
                    Ok(b) => operate(cmd, cfg, Arc::new(b)).await,
                    Err(e) => fail(
                        &cfg,
                        EXIT_UNAVAILABLE,
                        format!("redis at {}: {e}", redact_url(&cfg.redis.url)),
                    ),
                },
            }
        }
    }
}

/// Prints `msg` once, with every secret of `cfg` and every URL password redacted (library
/// errors may quote a URL), and returns `status`: as an error log line when logging is on
/// at that level, else on stderr as `claimgate: ...`.
fn fail(cfg: &Config, status: u8, msg: String) -> ExitCode {
    let msg = cfg.scrub(&msg);
    if tracing::enabled!(tracing::Level::ERROR) {
        tracing::error!("{msg}");
    } else {
        eprintln!("claimgate: {msg}");
    }
    ExitCode::from(status)
}

/// The exit status of a failed rebuild or reconcile: the operator's mistake (an unknown
/// batch, a live batch without `--force`) is a usage error; the rest is unavailability.
fn recovery_status(e: &RebuildError) -> u8 {
    match e {
        RebuildError::BatchNotFound(_) | RebuildError::Live(_) | RebuildError::Retired(_) => {
            EXIT_CONFIG
        }
        _ => EXIT_UNAVAILABLE,
    }
}

/// The report of `reconcile`, local or remote: each difference on a line and their count
/// (exit 1), or that the two agree (exit 0).
fn report_differences(backend: &str, lines: &[String]) -> ExitCode {
    if lines.is_empty() {
        say(&format!("the {backend} backend and the database agree"));
        return ExitCode::SUCCESS;
    }
    let mut text: String = lines.iter().map(|d| format!("{d}\n")).collect();
    text.push_str(&format!("{} difference(s)", lines.len()));
    say(&text);
    ExitCode::from(EXIT_DIFFERENCES)
}

/// The operator commands on an open backend: `rebuild`, local `reconcile`.
async fn operate<B: Backend>(cmd: Command, cfg: Arc<Config>, backend: Arc<B>) -> ExitCode {
    let db = match crate::gateway::open_store(&cfg).await {
        Ok(db) => db,
        Err(e) => return fail(&cfg, EXIT_UNAVAILABLE, e.to_string()),
    };
    let status = match cmd {
        Command::Rebuild(RebuildArgs { batch, force, .. }) => {
            match crate::recovery::rebuild(backend.as_ref(), &db, &batch, force).await {
                Ok(report) => {
                    say(&report.to_string());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(
                    &cfg,
                    recovery_status(&e),
                    format!("rebuild of {batch}: {e}"),
                ),
            }
        }
        Command::Reconcile(ReconcileArgs { batch, .. }) => {
            match crate::recovery::reconcile(backend.as_ref(), &db, batch.as_deref()).await {
                Ok(diffs) => {
                    let lines: Vec<String> = diffs.iter().map(ToString::to_string).collect();
                    report_differences(backend.kind(), &lines)
                }
                Err(e) => fail(&cfg, recovery_status(&e), format!("reconcile: {e}")),
            }
        }
        Command::Serve(_) | Command::Migrate(_) | Command::CheckConfig => ExitCode::SUCCESS,
        Command::Completions { .. } => ExitCode::SUCCESS,
    };
    if let Err(e) = backend.flush().await {
        tracing::warn!(error = %e, "final flush failed");
    }
    db.close().await;
    status
}

/// `reconcile --url`: the running gateway reconciles its own backend with the database.
async fn reconcile_remote(
    cfg: &Config,
    url: &str,
    batch: Option<&str>,
    timeout_s: u64,
) -> ExitCode {
    let token = cfg
        .auth
        .admin_token
        .as_ref()
        .map(|t| t.expose().to_string());
    let timeout = std::time::Duration::from_secs(timeout_s);
    match remote::reconcile(url, batch, token.as_deref(), timeout).await {
        Ok(report) => report_differences(&report.backend, &report.differences),
        Err(remote::RemoteError::Usage(msg)) => fail(cfg, EXIT_CONFIG, msg),
        Err(remote::RemoteError::Unavailable(msg)) => fail(cfg, EXIT_UNAVAILABLE, msg),
    }
}

/// SIGTERM or SIGINT. The handlers are registered when this is called, not when the future
/// is first polled: `serve` calls it before the gateway answers anything, so a signal sent
/// the instant `/healthz` answers starts the shutdown rather than killing the process
/// (CI stop 22 lost the shutdown's "bye" that way, with the handler in a task not yet run).
fn signalled() -> impl std::future::Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let handlers = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        async move {
            match handlers {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `serve`: the gateway of the composition root, until SIGTERM or SIGINT.
async fn serve(cfg: Config) -> ExitCode {
    let scrub = cfg.clone();
    let signal = signalled();
    let gateway = match crate::gateway::start(cfg).await {
        Ok(g) => g,
        Err(e) => return fail(&scrub, EXIT_UNAVAILABLE, e.to_string()),
    };
    let stop = gateway.shutdown_token();
    tokio::spawn(async move {
        signal.await;
        tracing::info!("shutdown requested");
        stop.cancel();
    });
    gateway.run().await;
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(args: &[&str]) -> Result<(Command, Vec<String>), String> {
        let mut all = vec!["claimgate"];
        all.extend(args);
        Cli::try_parse_from(all)
            .map_err(|e| e.to_string())?
            .resolve()
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_flags_before_the_command_apply_where_taken_and_are_refused_elsewhere() {
        let (c, o) = resolve(&["--listen", "127.0.0.1:1", "--backend", "redis"]).unwrap();
        assert!(matches!(c, Command::Serve(_)));
        assert!(
            o.contains(&"server.listen=\"127.0.0.1:1\"".to_string()),
            "{o:?}"
        );
        assert!(o.contains(&"backend=\"redis\"".to_string()), "{o:?}");
        let (c, o) = resolve(&["--backend", "redis", "rebuild", "--batch", "b"]).unwrap();
        assert!(matches!(c, Command::Rebuild(_)));
        assert!(o.contains(&"backend=\"redis\"".to_string()), "{o:?}");
        // the command's own flag wins over the one before it
        let (_, o) = resolve(&["--database-url", "a", "migrate", "--database-url", "b"]).unwrap();
        assert_eq!(o, vec!["database.url=\"b\"".to_string()]);
        for (args, flag) in [
            (&["--listen", "x", "migrate"][..], "--listen"),
            (&["--listen", "x", "reconcile"][..], "--listen"),
            (&["--redis-url", "redis://x", "migrate"][..], "--redis-url"),
            (&["--listen", "x", "completions", "bash"][..], "--listen"),
        ] {
            let e = resolve(args).unwrap_err();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
        // and after the command, clap refuses a flag the command does not have
        for args in [
            &["migrate", "--listen", "x"][..],
            &["check-config", "--database-url", "x"][..],
            &["reconcile", "--listen", "x"][..],
            &["reconcile", "--timeout-s", "5"][..],
        ] {
            assert!(resolve(args).is_err(), "{args:?}");
        }
        // before check-config, they shape the configuration it prints
        let (_, o) = resolve(&["--backend", "redis", "check-config"]).unwrap();
        assert_eq!(o, vec!["backend=\"redis\"".to_string()]);
        // -c and --set go anywhere
        let (c, o) = resolve(&["check-config", "-c", "x.toml", "--set", "log.json=true"]).unwrap();
        assert!(matches!(c, Command::CheckConfig));
        assert_eq!(o, vec!["log.json=true".to_string()]);
    }

    #[test]
    fn a_url_with_quotes_stays_one_toml_string() {
        let (_, o) = resolve(&["migrate", "--database-url", "sqlite://a\"b.db"]).unwrap();
        let t: toml::Table = o[0].parse().unwrap();
        assert_eq!(t["database"]["url"].as_str(), Some("sqlite://a\"b.db"));
    }
}
