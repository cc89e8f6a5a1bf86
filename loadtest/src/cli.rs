//! Command-line interface: the flags, their defaults, and the validation that turns them
//! into a checked run configuration (local-only target, bounded run, sane numbers).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Load tester for the claimgate coupon-claim gateway.
///
/// Drives a gateway on 127.0.0.1/localhost over HTTP/1.1 keep-alive connections, prints a
/// live progress line on stderr and a summary table on stdout, and optionally checks the
/// gateway's invariants after the run (`--verify`). Every run stops by itself: it is
/// bounded by `--duration` and/or `--requests` (10 s when neither is given).
#[derive(Debug, Clone, Parser)]
#[command(name = "claimgate-loadtest", version, about, long_about)]
pub struct Cli {
    /// Base URL of the gateway. Only http://127.0.0.1, http://localhost and http://[::1]
    /// (any port) are accepted.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// Workload to run.
    #[arg(long, value_enum, default_value_t = ScenarioKind::FlashSale)]
    pub scenario: ScenarioKind,

    /// Number of keep-alive connections (virtual clients). In closed loop each keeps one
    /// request in flight; in open loop they form the pool that carries the paced requests.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub connections: u32,

    /// Open loop: send at this fixed rate (requests per second) instead of as fast as
    /// answers come back. Latency is measured from each request's intended send time.
    #[arg(long)]
    pub rate: Option<f64>,

    /// Stop sending after this long (e.g. `30s`, `500ms`, `2m`; a bare number is seconds).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Stop after this many requests (measured phase only).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,

    /// Per-request timeout in milliseconds (connect + send + full response).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,

    /// Tokio worker threads: 1 runs everything on one current-thread runtime.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,

    /// Seed for users, request ids, tokens and the batch id (`lt-<seed>`).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Number of distinct (regular) users the scenario draws from.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub users: u64,

    /// Stock of the batch this run creates [default: 1000 for flash-sale, 10 for sold-out,
    /// 1000000 otherwise].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub stock: Option<u64>,

    /// Per-user limit of the batch this run creates.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub per_user_limit: u32,

    /// Use this existing batch instead of creating `lt-<seed>`. Without it, a run whose
    /// `lt-<seed>` already holds claims (an earlier run with the same seed) creates a fresh
    /// batch `lt-<seed>-<n>` instead, with a warning.
    #[arg(long)]
    pub batch: Option<String>,

    /// Admin bearer token for POST/GET /v1/batches. Prefer the environment variable: a
    /// value on the command line is visible to every user of the machine (`ps`).
    #[arg(long, env = "CLAIMGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// HS256 secret: when given, every claim carries `Authorization: Bearer <JWT>` with
    /// `sub` = the user id (tokens are deterministic: fixed `exp`). Prefer the
    /// environment variable, as for the admin token.
    #[arg(long, env = "CLAIMGATE_USER_TOKEN_SECRET", hide_env_values = true)]
    pub user_token_secret: Option<String>,

    /// hot-users: fraction of requests sent by bots (each bot is one user id that keeps
    /// claiming with fresh request ids).
    #[arg(long, default_value_t = 0.1)]
    pub bot_fraction: f64,

    /// hot-users: number of distinct bot user ids.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub bots: u64,

    /// hot-users: Zipf exponent of the user popularity (user of rank k has weight 1/k^s).
    #[arg(long, default_value_t = 1.0)]
    pub zipf_exponent: f64,

    /// retries: how many times each request id is sent (concurrently, by different
    /// connections).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub copies: u64,

    /// mixed: fraction of requests that are `GET /v1/batches/{id}` instead of claims.
    #[arg(long, default_value_t = 0.5)]
    pub read_fraction: f64,

    /// checkout: wallet reads (`GET /v1/users/{user}/coupons?status=unused`) per checkout,
    /// between the claim and the lock.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_WALLET_READS)))]
    pub wallet_reads: u32,

    /// checkout: how long (ms) a lock answered `404 coupon_not_found` (the claim has not
    /// reached the database yet) is retried before the checkout gives up.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(0..=MAX_LOCK_WAIT_MS))]
    pub lock_wait_ms: u64,

    /// Write the summary as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Write one JSON line per claim attempt to this file.
    #[arg(long)]
    pub history: Option<PathBuf>,

    /// Write charts of the measured phase to this file: throughput, latency percentiles
    /// and the persistence backlog (sampled from /readyz) over time. `.svg` writes one
    /// SVG image; `.html` (or `.htm`) a page with a summary table and the charts inline.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,

    /// The run is meant to overload the gateway: count `429 rate_limited` and
    /// `503 overloaded` answers as expected (they are unexpected otherwise, except
    /// `429 rate_limited` in hot-users).
    #[arg(long)]
    pub expect_shedding: bool,

    /// Exit with status 4 when any outcome was unexpected (a 5xx other than expected
    /// shedding, a transport error or timeout, an unknown code). Without it, outcomes do
    /// not change the exit status.
    #[arg(long)]
    pub fail_on_unexpected: bool,

    /// After the run, check the invariants through the admin API (and the database when
    /// `--database-url` is given). Exit status 1 when any check fails.
    #[arg(long)]
    pub verify: bool,

    /// Database to check that every issued coupon was persisted exactly once
    /// (`postgres://...` or `sqlite://...`; table `coupons`, column `coupon_id`).
    #[arg(long, requires = "verify")]
    pub database_url: Option<String>,

    /// How long `--verify` waits for coupons to reach the database.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// No live progress line on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// The workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScenarioKind {
    /// Distinct users rush one batch; each user claims once per round of `--users`.
    FlashSale,
    /// Zipf-distributed users plus bots that keep claiming for the same user id.
    HotUsers,
    /// Every request id is sent `--copies` times concurrently; all answers must agree.
    Retries,
    /// Claims mixed with batch reads (`--read-fraction`).
    Mixed,
    /// `GET /healthz` only: the HTTP ceiling of the gateway.
    Trivial,
    /// Claims against a batch that is drained to sold out before measuring.
    SoldOut,
    /// `GET /v1/products/{id}/batches` over a catalog of batches the run creates first.
    ProductLookup,
    /// `POST /v1/checkout/quote`: a 20-item cart against a wallet of 50 coupons the run
    /// claims (and waits to see persisted) first.
    Quote,
    /// Each virtual user claims a coupon, reads its wallet `--wallet-reads` times, locks
    /// the coupon for a fresh order and redeems it.
    Checkout,
}

/// Largest `--wallet-reads`.
pub const MAX_WALLET_READS: u32 = 100;
/// Largest `--lock-wait-ms`.
pub const MAX_LOCK_WAIT_MS: u64 = 60_000;

impl ScenarioKind {
    /// The name as given on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::FlashSale => "flash-sale",
            Self::HotUsers => "hot-users",
            Self::Retries => "retries",
            Self::Mixed => "mixed",
            Self::Trivial => "trivial",
            Self::SoldOut => "sold-out",
            Self::ProductLookup => "product-lookup",
            Self::Quote => "quote",
            Self::Checkout => "checkout",
        }
    }

    /// Whether the scenario sends claims (and therefore needs a batch).
    pub fn claims(self) -> bool {
        !matches!(self, Self::Trivial | Self::ProductLookup | Self::Quote)
    }

    /// Default stock of the batch created for this scenario.
    pub fn default_stock(self) -> u64 {
        match self {
            Self::FlashSale => 1_000,
            Self::SoldOut => 10,
            _ => 1_000_000,
        }
    }
}

impl fmt::Display for ScenarioKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Default run length when neither `--duration` nor `--requests` is given.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// Where the load goes: a loopback socket address plus what to put in `Host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The socket to connect to (always a loopback address).
    pub addr: SocketAddr,
    /// Value of the `Host` header (`host:port` as written in the URL).
    pub authority: String,
    /// Path prefix from the URL, without a trailing slash (usually empty).
    pub base_path: String,
}

impl Target {
    /// Absolute request path for an API path such as `/healthz`.
    pub fn path(&self, api_path: &str) -> String {
        format!("{}{api_path}", self.base_path)
    }
}

/// Why a `--url` was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("invalid URL {0:?}: {1}")]
    Invalid(String, String),
    #[error("unsupported scheme in {0:?}: only http:// is supported")]
    Scheme(String),
    #[error(
        "refusing to load {0:?}: only 127.0.0.1, localhost and [::1] targets are allowed \
         (load testing other hosts is forbidden)"
    )]
    NotLocal(String),
    #[error("URL {0:?} must not carry a query string or fragment")]
    Query(String),
}

/// Parses and checks `--url`: plain http, loopback host only.
pub fn parse_target(url: &str) -> Result<Target, UrlError> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| UrlError::Invalid(url.into(), e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(_) => return Err(UrlError::Scheme(url.into())),
        None => {
            return Err(UrlError::Invalid(
                url.into(),
                "missing http:// scheme".into(),
            ));
        }
    }
    let authority = uri
        .authority()
        .ok_or_else(|| UrlError::Invalid(url.into(), "missing host".into()))?;
    if authority.as_str().contains('@') {
        return Err(UrlError::Invalid(
            url.into(),
            "user info is not supported".into(),
        ));
    }
    if uri.query().is_some() || url.contains('#') {
        return Err(UrlError::Query(url.into()));
    }
    let host = authority.host();
    let ip = loopback_ip(host).ok_or_else(|| UrlError::NotLocal(url.into()))?;
    let port = authority.port_u16().unwrap_or(80);
    let base_path = uri.path().trim_end_matches('/').to_string();
    Ok(Target {
        addr: SocketAddr::new(ip, port),
        authority: authority.as_str().to_string(),
        base_path,
    })
}

/// The loopback address a host name stands for, or `None` when it is not local.
/// `localhost` is mapped to 127.0.0.1 without any name lookup.
fn loopback_ip(host: &str) -> Option<IpAddr> {
    if host.eq_ignore_ascii_case("localhost") {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = literal.parse().ok()?;
    ip.is_loopback().then_some(ip)
}

/// Parses `30s`, `1.5s`, `500ms`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?} (examples: 30s, 500ms, 2m)"))?;
    let seconds = match unit.trim() {
        "" | "s" | "sec" | "secs" => value,
        "ms" => value / 1_000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3_600.0,
        other => return Err(format!("unknown duration unit {other:?} in {text:?}")),
    };
    if !seconds.is_finite() || seconds <= 0.0 || seconds > 7.0 * 86_400.0 {
        return Err(format!("duration {text:?} must be > 0 and at most a week"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Cross-flag checks clap cannot express.
pub fn validate(cli: &Cli) -> Result<(), String> {
    if let Some(rate) = cli.rate
        && !(rate.is_finite() && rate > 0.0 && rate <= 10_000_000.0)
    {
        return Err(format!("--rate must be > 0 and <= 10000000, got {rate}"));
    }
    for (name, v) in [
        ("--bot-fraction", cli.bot_fraction),
        ("--read-fraction", cli.read_fraction),
    ] {
        if !(0.0..=1.0).contains(&v) {
            return Err(format!("{name} must be within 0..=1, got {v}"));
        }
    }
    if !(cli.zipf_exponent.is_finite() && cli.zipf_exponent >= 0.0) {
        return Err(format!(
            "--zipf-exponent must be >= 0, got {}",
            cli.zipf_exponent
        ));
    }
    if cli.scenario == ScenarioKind::HotUsers && cli.users > crate::scenario::MAX_ZIPF_USERS {
        return Err(format!(
            "hot-users supports at most {} --users",
            crate::scenario::MAX_ZIPF_USERS
        ));
    }
    if let Some(id) = &cli.batch
        && !valid_batch_id(id)
    {
        return Err(format!(
            "--batch {id:?} is not a batch id ([A-Za-z0-9_-]{{1,64}})"
        ));
    }
    if !cli.scenario.claims() {
        if cli.verify {
            return Err(format!(
                "--verify needs a claim scenario (not {})",
                cli.scenario
            ));
        }
        if cli.batch.is_some() {
            return Err(format!(
                "--batch is meaningless for the {} scenario",
                cli.scenario
            ));
        }
    }
    if let Some(path) = &cli.report
        && ReportFormat::of(path).is_none()
    {
        return Err(format!(
            "--report {} must end in .html, .htm or .svg",
            path.display()
        ));
    }
    if let Some(db) = &cli.database_url
        && !(db.starts_with("postgres://")
            || db.starts_with("postgresql://")
            || db.starts_with("sqlite:"))
    {
        return Err("--database-url must start with postgres:// or sqlite:".into());
    }
    Ok(())
}

/// What `--report` writes, from the file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportFormat {
    Html,
    Svg,
}

impl ReportFormat {
    pub fn of(path: &std::path::Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "html" | "htm" => Some(Self::Html),
            "svg" => Some(Self::Svg),
            _ => None,
        }
    }
}

/// Batch ids accepted by the gateway: `[A-Za-z0-9_-]{1,64}`.
pub fn valid_batch_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_loopback_targets() {
        let t = parse_target("http://127.0.0.1:8080").expect("ok");
        assert_eq!(t.addr, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(t.authority, "127.0.0.1:8080");
        assert_eq!(t.path("/healthz"), "/healthz");

        let t = parse_target("http://localhost:9000/").expect("ok");
        assert_eq!(t.addr, "127.0.0.1:9000".parse().expect("addr"));
        assert_eq!(t.authority, "localhost:9000");

        let t = parse_target("http://[::1]:81/gw/").expect("ok");
        assert_eq!(t.addr, "[::1]:81".parse().expect("addr"));
        assert_eq!(t.path("/healthz"), "/gw/healthz");

        let t = parse_target("http://127.1.2.3").expect("ok");
        assert_eq!(t.addr.port(), 80);
    }

    #[test]
    fn refuses_other_hosts() {
        for url in [
            "http://10.0.0.1:8080",
            "http://example.com",
            "http://localhost.example.com",
            "http://0.0.0.0:8080",
            "http://[2001:db8::1]:80",
        ] {
            assert!(
                matches!(parse_target(url), Err(UrlError::NotLocal(_))),
                "{url} must be refused"
            );
        }
        let msg = parse_target("http://example.com")
            .expect_err("refused")
            .to_string();
        assert!(msg.contains("only 127.0.0.1, localhost"), "{msg}");
        assert!(matches!(
            parse_target("https://127.0.0.1"),
            Err(UrlError::Scheme(_))
        ));
        assert!(parse_target("127.0.0.1:8080").is_err());
        assert!(parse_target("http://u:p@127.0.0.1").is_err());
        assert!(matches!(
            parse_target("http://127.0.0.1/?a=1"),
            Err(UrlError::Query(_))
        ));
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn validates_combinations() {
        let base = Cli::parse_from(["claimgate-loadtest"]);
        assert_eq!(validate(&base), Ok(()));

        let mut c = base.clone();
        c.rate = Some(0.0);
        assert!(validate(&c).is_err());

        let mut c = base.clone();
        c.read_fraction = 1.5;
        assert!(validate(&c).is_err());

        let mut c = base.clone();
        c.scenario = ScenarioKind::Trivial;
        c.verify = true;
        assert!(validate(&c).is_err());

        let mut c = base.clone();
        c.batch = Some("bad id!".into());
        assert!(validate(&c).is_err());

        let c = Cli::parse_from([
            "claimgate-loadtest",
            "--verify",
            "--database-url",
            "mysql://x",
        ]);
        assert!(validate(&c).is_err());
        assert!(
            Cli::try_parse_from(["claimgate-loadtest", "--database-url", "sqlite://x"]).is_err(),
            "--database-url requires --verify"
        );

        for ok in ["r.html", "r.HTM", "dir/r.svg"] {
            let c = Cli::parse_from(["claimgate-loadtest", "--report", ok]);
            assert_eq!(validate(&c), Ok(()), "{ok}");
        }
        for bad in ["r.png", "report", "r.html.txt"] {
            let c = Cli::parse_from(["claimgate-loadtest", "--report", bad]);
            let e = validate(&c).expect_err(bad);
            assert!(e.contains(".html, .htm or .svg"), "{e}");
        }
        assert_eq!(
            ReportFormat::of(std::path::Path::new("x.svg")),
            Some(ReportFormat::Svg)
        );
    }

    #[test]
    fn secrets_come_from_the_environment_without_showing_in_help() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let admin = cmd
            .get_arguments()
            .find(|a| a.get_id() == "admin_token")
            .expect("--admin-token");
        assert_eq!(
            admin.get_env().and_then(|e| e.to_str()),
            Some("CLAIMGATE_ADMIN_TOKEN")
        );
        assert!(admin.is_hide_env_values_set());
        let user = cmd
            .get_arguments()
            .find(|a| a.get_id() == "user_token_secret")
            .expect("--user-token-secret");
        assert_eq!(
            user.get_env().and_then(|e| e.to_str()),
            Some("CLAIMGATE_USER_TOKEN_SECRET")
        );
        assert!(user.is_hide_env_values_set());
    }

    #[test]
    fn checkout_flags_are_bounded() {
        let c = Cli::parse_from(["claimgate-loadtest", "--scenario", "checkout", "--verify"]);
        assert_eq!(c.scenario, ScenarioKind::Checkout);
        assert!(
            c.scenario.claims(),
            "checkout creates a batch and can be verified"
        );
        assert_eq!(validate(&c), Ok(()));
        assert_eq!((c.wallet_reads, c.lock_wait_ms), (3, 5000));
        let ok = Cli::parse_from([
            "claimgate-loadtest",
            "--wallet-reads",
            "0",
            "--lock-wait-ms",
            "60000",
        ]);
        assert_eq!((ok.wallet_reads, ok.lock_wait_ms), (0, 60_000));
        for bad in [
            ["--wallet-reads", "101"],
            ["--lock-wait-ms", "60001"],
            ["--wallet-reads", "-1"],
        ] {
            assert!(
                Cli::try_parse_from(["claimgate-loadtest", bad[0], bad[1]]).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn batch_ids() {
        assert!(valid_batch_id("lt-1_A"));
        assert!(!valid_batch_id(""));
        assert!(!valid_batch_id("a/b"));
        assert!(!valid_batch_id(&"a".repeat(65)));
    }
}
