//! Orchestration of one invocation: check the flags, prepare the batch (a fresh one when
//! the seed's batch was already claimed from), drain it (sold-out scenario), run the
//! measured phase with live progress (and `/readyz` backlog sampling for `--report`),
//! write the table / JSON / history / report and run `--verify`. Also maps the result to
//! the process exit status.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::admin;
use crate::auth::TokenSigner;
use crate::cli::{self, Cli, ScenarioKind};
use crate::client::{Api, Connection};
use crate::db;
use crate::driver::{self, CheckoutConfig, DriverConfig, Mode, RunContext};
use crate::history::{self, ClaimRecord, Phase};
use crate::outcome::Expectations;
use crate::plot::{self, ReportData};
use crate::progress::{self, Live};
use crate::report::{RunInfo, SellOut, Summary};
use crate::scenario::{self, Plan, PlanParams};
use crate::timeline::{self, BacklogSeries, Timeline};
use crate::verify::{self, Check, Verdict, VerifySummary};

/// Exit status when every check passed (or none was asked for).
pub const EXIT_OK: u8 = 0;
/// Exit status when `--verify` found a violation.
pub const EXIT_VERIFY_FAILED: u8 = 1;
/// Exit status for invalid flags (clap uses the same).
pub const EXIT_USAGE: u8 = 2;
/// Exit status when the run could not be carried out (gateway unreachable, batch could
/// not be created, ...).
pub const EXIT_RUNTIME: u8 = 3;
/// Exit status with `--fail-on-unexpected` when some outcome was unexpected (and every
/// `--verify` check passed).
pub const EXIT_UNEXPECTED: u8 = 4;

/// The sold-out drain stops after this long even if `--duration` is shorter.
const MIN_DRAIN_TIME: Duration = Duration::from_secs(60);

/// Connections used to drain a batch.
const DRAIN_CONNECTIONS: u32 = 16;

/// A flag combination the run cannot use.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The result of a completed invocation.
#[derive(Debug)]
pub struct Outcome {
    pub summary: Summary,
    /// Checks that failed (0 without `--verify`).
    pub failed_checks: u64,
    /// `--fail-on-unexpected` was given.
    pub fail_on_unexpected: bool,
}

/// The process exit status of an invocation's result.
pub fn exit_status(result: &anyhow::Result<Outcome>) -> u8 {
    match result {
        Ok(o) if o.failed_checks > 0 => EXIT_VERIFY_FAILED,
        Ok(o) if o.fail_on_unexpected && o.summary.unexpected > 0 => EXIT_UNEXPECTED,
        Ok(_) => EXIT_OK,
        Err(e) if e.downcast_ref::<UsageError>().is_some() => EXIT_USAGE,
        Err(_) => EXIT_RUNTIME,
    }
}

/// `error: cause: cause...` on one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Runs the tool on its own runtime and returns the exit status.
pub fn main(cli: Cli) -> ExitCode {
    let runtime = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(cli.threads))
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let result = runtime.block_on(async {
        let (cancel_tx, cancel_rx) = watch::channel(false);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\ninterrupted: finishing in-flight requests (Ctrl-C again to abort)");
                cancel_tx.send_replace(true);
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
        let mut out = std::io::stdout();
        execute(cli, cancel_rx, &mut out).await
    });
    if let Err(e) = &result {
        eprintln!("error: {e:#}");
    }
    ExitCode::from(exit_status(&result))
}

/// Prints a warning on stderr now and keeps it for the summary.
fn warn(warnings: &mut Vec<String>, text: String) {
    eprintln!("warning: {text}");
    warnings.push(text);
}

/// Carries out one invocation, printing the table and check lines to `out` and progress
/// and notices to stderr.
pub async fn execute(
    cli: Cli,
    cancel: watch::Receiver<bool>,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    cli::validate(&cli).map_err(UsageError)?;
    let target = Arc::new(cli::parse_target(&cli.url).map_err(|e| UsageError(e.to_string()))?);
    let timeout = Duration::from_millis(cli.timeout_ms);
    let epoch = Instant::now();
    let scenario = cli.scenario;

    let mut admin_conn = Connection::new(Arc::clone(&target));
    admin_conn
        .warm_up(timeout)
        .await
        .with_context(|| format!("cannot connect to the gateway at {}", cli.url))?;

    let mut batch_id = scenario.claims().then(|| {
        cli.batch
            .clone()
            .unwrap_or_else(|| scenario::default_batch_id(cli.seed))
    });
    let signer = cli.user_token_secret.as_deref().map(TokenSigner::new);
    let mut api = Api::new(
        Arc::clone(&target),
        batch_id.as_deref().unwrap_or(""),
        cli.admin_token.as_deref(),
        signer,
    )
    .map_err(|e| UsageError(error_chain(&e)))?;
    let mut warnings = Vec::new();

    if scenario == ScenarioKind::Retries && u64::from(cli.connections) < cli.copies {
        eprintln!(
            "note: --connections {} < --copies {}: copies of a request id cannot all be in \
             flight at once",
            cli.connections, cli.copies
        );
    }
    let sole_client = cli.batch.is_none();
    let mut per_user_limit = cli.per_user_limit;
    let mut available = cli.stock.unwrap_or(scenario.default_stock());
    if let Some(id) = batch_id.clone() {
        if cli.batch.is_none() {
            let own = admin::create_own_batch(
                &mut admin_conn,
                &api,
                &id,
                available,
                per_user_limit,
                timeout,
            )
            .await
            .with_context(|| format!("creating batch {id}"))?;
            if let Some(w) = admin::fresh_batch_warning(&own, cli.seed) {
                warn(&mut warnings, w);
            }
            eprintln!(
                "created batch {}: stock {available}, per-user limit {per_user_limit}",
                own.id
            );
            batch_id = Some(own.id);
            api = own.api;
        } else {
            let (facts, limit) = admin::get_batch(&mut admin_conn, &api, &id, timeout)
                .await
                .with_context(|| format!("reading batch {id}"))?;
            per_user_limit = limit.unwrap_or(per_user_limit);
            available = facts
                .remaining
                .unwrap_or(facts.total.saturating_sub(facts.claimed));
            eprintln!(
                "using batch {id}: stock {}, claimed {}, remaining {available}, per-user limit \
                 {per_user_limit}",
                facts.total, facts.claimed
            );
            if scenario != ScenarioKind::SoldOut
                && let Some(w) = admin::drained_batch_warning(&id, &facts)
            {
                warn(&mut warnings, w);
            }
        }
    }
    match scenario {
        ScenarioKind::ProductLookup => {
            crate::campaign::setup_products(&mut admin_conn, &api, cli.seed, timeout).await?
        }
        ScenarioKind::Quote => {
            let (body, user) =
                crate::campaign::setup_quote(&mut admin_conn, &api, cli.seed, timeout).await?;
            api = api.with_quote(body, &user);
        }
        ScenarioKind::Checkout => {
            let id = batch_id.as_deref().unwrap_or_default();
            crate::campaign::setup_checkout(&mut admin_conn, &api, id, cli.seed, timeout).await?;
        }
        _ => {}
    }
    let api = Arc::new(api);
    let expect = |phase| Expectations {
        scenario,
        phase,
        shedding: cli.expect_shedding,
        foreign_batch: cli.batch.is_some(),
    };
    let mut sell_out: Option<SellOut> = None;

    let record = cli.verify || cli.history.is_some();
    let mut history: Vec<ClaimRecord> = Vec::new();
    let connect = || Connection::new(Arc::clone(&target));

    if scenario == ScenarioKind::SoldOut {
        let id = batch_id.as_deref().unwrap_or_default();
        let cfg = DriverConfig {
            connections: cli.connections.min(DRAIN_CONNECTIONS),
            mode: Mode::Closed,
            duration: Some(cli.duration.unwrap_or_default().max(MIN_DRAIN_TIME)),
            requests: Some(available.saturating_mul(3).saturating_add(1000)),
            timeout,
            record_history: record,
            stop_on_sold_out: true,
            phase: Phase::Drain,
            expect: expect(Phase::Drain),
            timeline: false,
            checkout: CheckoutConfig::default(),
        };
        let ctx = RunContext {
            plan: Arc::new(Plan::drain(cli.seed)),
            api: Arc::clone(&api),
            epoch,
            live: Arc::new(Live::default()),
            cancel: cancel.clone(),
        };
        let r = driver::run(&cfg, &ctx, connect, |_| {}).await?;
        history.extend(r.history);
        if r.interrupted {
            anyhow::bail!("interrupted while draining batch {id}");
        }
        if !r.sold_out_seen {
            anyhow::bail!(
                "batch {id} did not sell out after {} drain claims (answers: {:?}); use a \
                 smaller --stock",
                r.stats.requests,
                r.stats.by_outcome()
            );
        }
        eprintln!(
            "drained batch {id}: {} coupons claimed in {:.2} s, now sold out",
            r.stats.claims_ok,
            r.elapsed.as_secs_f64()
        );
        sell_out = r
            .sold_out_after
            .map(|after| SellOut::new(Phase::Drain, after, r.stats.claims_ok));
    }

    let cfg = DriverConfig {
        connections: cli.connections,
        mode: cli.rate.map_or(Mode::Closed, |rate| Mode::Open { rate }),
        duration: match (cli.duration, cli.requests) {
            (None, None) => Some(cli::DEFAULT_DURATION),
            (d, _) => d,
        },
        requests: cli.requests,
        timeout,
        record_history: record,
        stop_on_sold_out: false,
        phase: Phase::Measure,
        expect: expect(Phase::Measure),
        timeline: cli.report.is_some(),
        checkout: CheckoutConfig {
            wallet_reads: cli.wallet_reads,
            lock_wait: Duration::from_millis(cli.lock_wait_ms),
        },
    };
    let params = PlanParams {
        seed: cli.seed,
        users: cli.users,
        bot_fraction: cli.bot_fraction,
        bots: cli.bots,
        zipf_exponent: cli.zipf_exponent,
        copies: cli.copies,
        read_fraction: cli.read_fraction,
    };
    let live = Arc::new(Live::default());
    let ctx = RunContext {
        plan: Arc::new(Plan::for_scenario(scenario, &params)),
        api: Arc::clone(&api),
        epoch,
        live: Arc::clone(&live),
        cancel: cancel.clone(),
    };
    let (progress_tx, progress_rx) = watch::channel(false);
    let mut progress = None;
    let mut sampler = None;
    let run = driver::run(&cfg, &ctx, connect, |t0| {
        if !cli.quiet {
            progress = Some(progress::spawn(live, t0, progress_rx.clone()));
        }
        if cli.report.is_some() {
            sampler = Some(timeline::spawn_backlog_sampler(
                Connection::new(Arc::clone(&target)),
                Arc::clone(&api),
                t0,
                timeout,
                progress_rx,
            ));
        }
    })
    .await;
    progress_tx.send_replace(true);
    if let Some(p) = progress {
        // The progress task only prints; if it failed there is nothing to recover.
        let _ = p.await;
    }
    let backlog = match sampler {
        Some(s) => s.await.unwrap_or_else(|e| BacklogSeries {
            note: Some(format!("the backlog sampler failed: {e}")),
            ..BacklogSeries::default()
        }),
        None => BacklogSeries::default(),
    };
    let r = run?;
    history.extend(r.history);
    let redeemed = r.redeemed;
    if scenario != ScenarioKind::SoldOut {
        sell_out = r
            .sold_out_after
            .map(|after| SellOut::new(Phase::Measure, after, r.stats.claims_ok));
    }

    let mut summary = Summary::new(
        RunInfo {
            scenario: scenario.name().to_string(),
            target_rate: cli.rate,
            connections: cli.connections,
            url: cli.url.clone(),
            batch_id: batch_id.clone(),
            seed: cli.seed,
            elapsed: r.elapsed,
            unsent: r.unsent,
            interrupted: r.interrupted,
            expect: cfg.expect,
            sell_out,
            warnings,
        },
        &r.stats,
    );
    write!(out, "{}", summary.table()).context("writing the summary")?;

    if let Some(path) = &cli.history {
        history::write_jsonl(path, &history)
            .with_context(|| format!("writing --history {}", path.display()))?;
    }

    if cli.verify
        && let Some(id) = &batch_id
    {
        let mut checks = Vec::new();
        let facts = match admin::get_batch(&mut admin_conn, &api, id, timeout).await {
            Ok((facts, limit)) => {
                per_user_limit = limit.unwrap_or(per_user_limit);
                Some(facts)
            }
            Err(e) => {
                checks.push(Check::new(
                    "batch readable",
                    Verdict::Fail,
                    format!("GET /v1/batches/{id}: {}", error_chain(&e)),
                ));
                None
            }
        };
        checks.extend(verify::check_history(
            &history,
            facts,
            verify::Context {
                per_user_limit,
                sole_client,
            },
        ));
        if scenario == ScenarioKind::Checkout {
            checks.extend(
                crate::wallet::verify(
                    &mut admin_conn,
                    &api,
                    &history,
                    &redeemed,
                    timeout,
                    cli.drain_timeout,
                )
                .await,
            );
        }
        if let Some(url) = &cli.database_url {
            let coupons: BTreeSet<String> = history
                .iter()
                .filter(|r| r.succeeded())
                .filter_map(|r| r.coupon_id.clone())
                .collect();
            checks.push(db::check_persisted(url, &coupons, cli.drain_timeout).await);
        }
        let verified = VerifySummary::new(checks);
        write!(out, "{}", verified.render()).context("writing the checks")?;
        summary.verify = Some(verified);
    }
    out.flush().context("writing the summary")?;

    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&summary).context("encoding the JSON summary")?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("writing --json {}", path.display()))?;
    }
    if let Some(path) = &cli.report {
        let empty = Timeline::default();
        plot::write(
            path,
            &ReportData {
                summary: &summary,
                timeline: r.timeline.as_ref().unwrap_or(&empty),
                elapsed: r.elapsed,
                backlog: &backlog,
            },
        )
        .with_context(|| format!("writing --report {}", path.display()))?;
    }
    let failed_checks = summary.verify.as_ref().map_or(0, |v| v.failed);
    Ok(Outcome {
        summary,
        failed_checks,
        fail_on_unexpected: cli.fail_on_unexpected,
    })
}
