#![forbid(unsafe_code)]
//! claimgate: a Redis-native, high-concurrency coupon claim gateway.
//!
//! The claim path, one module per stage: [`router`] (parse) -> [`claim`] (validate and
//! orchestrate) -> [`auth`] (identify) -> [`limits`] (rate limits, admission) -> [`cache`]
//! (hot keys) -> [`stock`] (one Lua script on the home shard, via a [`backend`]) -> reply
//! ([`outcome`] decodes the script, [`error`] maps to HTTP). Off the request path:
//! [`persist`] (Redis log -> database), [`rebuild`] (database -> Redis), [`app`] loops.

pub mod admin;
pub mod app;
pub mod backend;
pub mod cache;
pub mod claim;
pub mod cli;
pub mod config;
pub mod contract;
pub mod domain;
pub mod error;
pub mod obs;
pub mod ops;
pub mod persist;
pub mod recovery;
pub mod router;
pub mod server;
pub mod stock;
pub mod store;
pub mod wallet;
