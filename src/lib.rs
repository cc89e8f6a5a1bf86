#![forbid(unsafe_code)]
//! claimgate: a Redis-native, high-concurrency coupon claim gateway.
//!
//! # Layout
//!
//! The modules are layers; a module imports only from layers below it (`tests/layering.rs`
//! checks every `crate::` path). Top to bottom:
//!
//! | layer | modules | job |
//! |-------|---------|-----|
//! | root | [`cli`], [`gateway`] | the command line; the composition root: wiring, startup, the one shutdown sequence, the background loops |
//! | http | [`http`] | server, router, request bodies, ops endpoints, errors as HTTP |
//! | api | [`api`] | the claim, admin, wallet, event-ledger, catalog (product pages, listing) and quote handlers (orchestration only), `ApiError` and the one conversion of each domain error |
//! | off the request path | [`persist`], [`recovery`], [`notify`], [`jobs`] | Redis logs -> database; rebuild and reconcile; events out (outbox -> signed webhook) and the coupon sweeps; bulk grant jobs (spooled uploads run through the claim script, resumed after a crash) |
//! | services | [`catalog`], [`stock`] | what an instance knows of batches (cache + loader + product-page index); sharded stock: claim + refill, transfers + sweeper, the census |
//! | contracts | [`contract`], [`store`] | the typed Lua API (one module per script, key layout, claim-record codec); the database |
//! | backend | [`backend`] | raw script calls: Redis (fred) and embedded (mlua + an in-memory keyspace) |
//! | domain | [`domain`] | batch model and validation, ids, time and the clock, the claim record, the coupon state machine, auth, edge limits, the checkout quote |
//! | leaves | [`config`], [`obs`] | configuration (every section, checked at load); metric names and one struct per counted event |
//!
//! The request path of a claim: [`http::server`] -> [`http::router`] -> [`api::claim`] ->
//! [`domain::auth`], [`domain::limits`] -> [`catalog`] (cache) -> [`stock::claim`] ->
//! [`contract::claim`] -> [`backend`] -> `lua/claim.lua`. The record path:
//! `lua/claim.lua` (stream entry) -> [`persist`] ([`contract::log_read`],
//! [`contract::claim_record`]) -> [`store`] -> [`contract::log_ack`].
//! `docs/ARCHITECTURE.md` has the map, with every invariant and where it is kept and
//! tested.

pub mod api;
pub mod backend;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod contract;
pub mod coupons;
pub mod domain;
pub mod gateway;
pub mod http;
pub mod jobs;
pub mod notify;
pub mod obs;
pub mod persist;
pub mod recovery;
pub mod stock;
pub mod store;
