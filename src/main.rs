#![forbid(unsafe_code)]
//! claimgate binary: all the work is in the library; see `claimgate::cli`.

fn main() -> std::process::ExitCode {
    claimgate::cli::main()
}
