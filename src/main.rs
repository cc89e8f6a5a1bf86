#![forbid(unsafe_code)]
//! claimgate binary: all the work is in the library; see `claimgate::cli`.

/// mimalloc: the claim path allocates many small, short-lived buffers; glibc malloc cost
/// about a quarter of the gateway's CPU under load (perf, cpu-clock).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    claimgate::cli::main()
}
