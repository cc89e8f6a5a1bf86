//! The redis backend against a real Redis Cluster (3 primaries started by the test): the
//! shards of a batch spread over the nodes, every script touches one slot (no CROSSSLOT),
//! scripts are loaded on every primary, and sold out reaches a second instance by pub/sub.

mod support;

use std::sync::Arc;
use std::time::Duration;

use claimgate::backend::redis::RedisBackend;
use claimgate::config::RedisConfig;
use claimgate::http::App;
use serde_json::json;
use support::RedisCluster;
use support::gw::*;
use tokio_util::sync::CancellationToken;

async fn cluster_app(
    cluster: &RedisCluster,
    g: &Gw<claimgate::backend::embedded::EmbeddedBackend>,
) -> Arc<App<RedisBackend>> {
    let backend = RedisBackend::connect(&RedisConfig {
        url: cluster.url(),
        cluster: true,
        ..RedisConfig::default()
    })
    .await
    .expect("connect to the cluster");
    claimgate::gateway::assemble(g.cfg.clone(), Arc::new(backend), g.db.clone(), None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flash_sale_on_redis_cluster() {
    let cluster = RedisCluster::start(3);
    // an embedded gateway only lends its config and (SQLite) database
    let host = embedded_gw().await;
    let a = cluster_app(&cluster, &host).await;
    let b = cluster_app(&cluster, &host).await;
    let stop = CancellationToken::new();
    claimgate::gateway::spawn_background(&b, stop.child_token());

    let body = batch_json("cl", 100, 1, json!({"shards": 16}));
    let (s, v) = call(&a, "POST", "/v1/batches", body).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(claim(&b, "cl", "warm-b", None).await.0, 201);

    let mut tasks = Vec::new();
    for i in 0..1000 {
        let app = a.clone();
        tasks.push(tokio::spawn(async move {
            claim(&app, "cl", &format!("user{i}"), None).await
        }));
    }
    let (mut ok, mut gone) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            (201, _) => ok += 1,
            (410, _) => gone += 1,
            (s, v) => panic!("{s} {v}"),
        }
    }
    assert_eq!((ok, gone), (99, 901), "100 stock, one taken by the warm-up");
    let keys = a.catalog().load("cl").await.unwrap().keys.clone();
    let c = a.stock().conservation(&keys).await.unwrap();
    assert!(c.holds() && c.claimed == 100, "{c:?}");
    // the batch really is spread over the cluster
    let counts = cluster.key_counts();
    assert!(counts.iter().all(|&n| n > 0), "keys per node: {counts:?}");
    // sold out reached the other instance through cluster pub/sub
    let entry = b.catalog().load("cl").await.unwrap();
    for _ in 0..200 {
        if entry.is_sold_out() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(entry.is_sold_out(), "sold out broadcast over the cluster");
    stop.cancel();
}
