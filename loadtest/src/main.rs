//! claimgate-loadtest: drives a local claimgate gateway over HTTP/1.1 keep-alive
//! connections, reports throughput and latency, and checks the gateway's invariants.
//! This file only parses the flags; `app.rs` (in the library) runs the invocation.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

/// mimalloc: the load generator shares the machine with the gateway it measures, so its
/// own allocation cost matters.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    claimgate_loadtest::app::main(claimgate_loadtest::cli::Cli::parse())
}
