//! A watchdog for tests: nothing may hang, the test suite included.
//!
//! Invariant kept here: a test that arms a [`Watchdog`] either finishes within its bound or
//! the whole test process fails with exit status 1, after printing the test's name, the last
//! step it announced with [`step`] and, where gdb is installed, every thread's stack. A
//! deadlocked worker thread cannot stop it: the watchdog is an OS thread of its own, and
//! `tokio::time::timeout` would never fire on a runtime whose threads are stuck.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

static LAST_STEP: Mutex<Option<(String, Instant)>> = Mutex::new(None);

/// Records what the test is doing now, for the hang report.
pub fn step(what: impl Into<String>) {
    *LAST_STEP.lock() = Some((what.into(), Instant::now()));
}

/// Fails the process if not dropped within its bound.
pub struct Watchdog {
    done: Arc<AtomicBool>,
}

impl Watchdog {
    /// Arms a watchdog for the calling test (named after its thread, which libtest names
    /// after the test).
    pub fn arm(bound: Duration) -> Watchdog {
        let name = std::thread::current()
            .name()
            .unwrap_or("<unnamed test>")
            .to_string();
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        std::thread::Builder::new()
            .name(format!("watchdog {name}"))
            .spawn(move || {
                let started = Instant::now();
                while started.elapsed() < bound {
                    if flag.load(Ordering::Acquire) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50).min(bound));
                }
                if flag.load(Ordering::Acquire) {
                    return;
                }
                report_hang(&name, bound);
                std::process::exit(1);
            })
            .expect("spawn watchdog thread");
        Watchdog { done }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
    }
}

/// Written straight to the process's stderr: libtest captures `eprintln!` of the test's
/// threads (this one inherits the capture) and would drop it when the process exits.
fn say(text: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
    let _ = err.write_all(b"\n");
    let _ = err.flush();
}

fn report_hang(name: &str, bound: Duration) {
    let step = match LAST_STEP.lock().as_ref() {
        Some((s, at)) => format!("{s:?} ({:.1?} ago)", at.elapsed()),
        None => "none announced".to_string(),
    };
    say(&format!(
        "\n==== TEST HUNG: {name} did not finish within {bound:?}; last step: {step} ===="
    ));
    let pid = std::process::id().to_string();
    match std::process::Command::new("gdb")
        .args(["-p", &pid, "-batch", "-nx", "-ex", "thread apply all bt 30"])
        .stdin(std::process::Stdio::null())
        .output()
    {
        Ok(out) => say(&format!(
            "==== thread stacks (gdb) ====\n{}",
            String::from_utf8_lossy(&out.stdout)
        )),
        Err(_) => say("(install gdb to see every thread's stack here)"),
    }
    say(&format!("==== end of hang report for {name} ===="));
}
