//! The background loops scale with what can still change, not with history (issue 14 item
//! 4): a batch whose claim window ended and whose slots hold no open transfer is not swept
//! again, until a patch reopens its window. Its own test binary: it counts the process's
//! script calls through the metrics, which no other test may add to.

mod support;

use std::time::Duration;

use serde_json::json;
use support::gw::*;
use support::watchdog::Watchdog;
use tokio_util::sync::CancellationToken;

/// Probe script calls so far (the sweeper's only script: one per slot swept).
fn probes() -> u64 {
    claimgate::obs::metrics::install()
        .render()
        .lines()
        .filter(|l| {
            l.starts_with("claimgate_backend_calls_total{")
                && l.contains("script=\"probe\"")
                && l.contains("result=\"ok\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_batch_is_swept_until_settled_and_again_once_reopened() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let g = embedded_gw_with(&[
        "stock.sweep_interval_ms=10".to_string(),
        "cache.refresh_ms=10".to_string(),
        // ended in 2020: with retirement on, the retirer would take it out of Redis
        "batches.retire_after_ms=0".to_string(),
    ])
    .await;
    create(
        &g,
        "old",
        10,
        1,
        json!({"shards": 4, "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2020-06-01T00:00:00Z"}}),
    )
    .await;
    let stop = CancellationToken::new();
    let loops = claimgate::gateway::spawn_background(&g.app, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let settled = probes();
    assert!(settled >= 5, "swept once at least (5 slots): {settled}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(probes(), settled, "a settled batch is not swept again");
    // reopened: swept again, every tick
    let (s, v) = call(
        &g.app,
        "PATCH",
        "/v1/batches/old",
        json!({"claim_window": {"end": "2100-01-01T00:00:00Z"}}).to_string(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reopened = probes();
    assert!(
        reopened >= settled + 5 * 10,
        "a reopened batch is swept every tick: {settled} -> {reopened}"
    );
    stop.cancel();
    for l in loops {
        l.await.unwrap();
    }
}
