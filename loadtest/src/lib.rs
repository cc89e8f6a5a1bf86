//! claimgate-loadtest library: everything behind the `claimgate-loadtest` binary, split
//! by job (flags, workloads, HTTP client, load driver, outcome classes, reports and
//! charts, invariant checks, the checkout scenario's wallet check), so that the pieces can be tested on their own and against
//! an in-process fake gateway.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod campaign;
pub mod cli;
pub mod client;
pub mod db;
pub mod driver;
pub mod history;
pub mod outcome;
pub mod plot;
pub mod progress;
pub mod report;
pub mod scenario;
pub mod timeline;
pub mod verify;
pub mod wallet;

#[cfg(test)]
mod e2e_tests;
#[cfg(test)]
mod testserver;
