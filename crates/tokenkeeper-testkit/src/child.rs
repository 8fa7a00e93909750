//! Child processes that are the test binary itself, re-invoked.
//!
//! A multi-process test re-runs its own binary as its [`ENTRY`] test alone, with an
//! environment variable that makes that test do a child's work; run by the harness without
//! the variable, the entry test returns at once:
//!
//! ```ignore
//! #[test]
//! fn child_process_entry() {
//!     let Some(what) = tokenkeeper_testkit::child::is_child("TK_MY_CHILD") else {
//!         return;
//!     };
//!     // … the child's work, its report on stdout …
//! }
//!
//! let child = tokenkeeper_testkit::child::spawn_self(&[("TK_MY_CHILD", "1")]);
//! ```

use std::process::{Child, Command, Stdio};

/// The name of the test a child process runs, at the root of its test binary.
pub const ENTRY: &str = "child_process_entry";

/// The value of `var` when this process is a child started with it, `None` otherwise (the
/// harness running the entry test as an ordinary test).
pub fn is_child(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

/// The command that re-runs this test binary as its [`ENTRY`] test alone (output shown, one
/// test thread) with `env` set; stdio is the caller's to choose.
pub fn self_command(env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(std::env::current_exe().expect("the test binary"));
    command
        .args(["--exact", ENTRY, "--nocapture", "--test-threads=1"])
        .envs(env.iter().copied());
    command
}

/// Starts [`self_command`] with its stdin and stdout piped to us (a line protocol, or a
/// report to read at the end); its stderr goes where ours does.
pub fn spawn_self(env: &[(&str, &str)]) -> Child {
    self_command(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn a child process")
}
