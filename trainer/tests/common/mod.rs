//! The harness the binary's integration tests share (`cli.rs`, `bad_input.rs`): run
//! `clayflow` in a folder under a wall-clock limit and collect what it printed.
//!
//! Each test file compiles this module on its own and uses a different part of it.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clayflow_trainer::checkpoint;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_clayflow");
/// The bundled data folder.
pub const DATA_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../data");

/// Longest any single command may take before it counts as hung.
pub const LIMIT: Duration = Duration::from_secs(60);

/// The bundled 8,000 MNIST digits.
pub fn mnist() -> PathBuf {
    Path::new(DATA_DIR).join("mnist8k-train-images-idx3-ubyte.gz")
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Out {
    /// Exit status (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
    /// Wall-clock seconds the command ran.
    pub secs: f64,
}

impl Out {
    /// Asserts the command exited 0.
    pub fn ok(self) -> Out {
        assert_eq!(
            self.code,
            Some(0),
            "command failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Asserts the command failed with an error message on stderr.
    pub fn failed(self) -> Out {
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "command should have failed with an error (got {:?})\nstdout:\n{}\nstderr:\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
        assert!(
            self.stderr.contains("error"),
            "no error message on stderr: {}",
            self.stderr
        );
        self
    }
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `clayflow ARGS` in `cwd`, killing it after `limit`.
pub fn run_in(cwd: &Path, args: &[&str], limit: Duration) -> Out {
    run_env(cwd, args, limit, &[])
}

/// [`run_in`] with extra environment variables. The checkpoint test hook is always unset,
/// so a developer's shell cannot slow these runs down.
pub fn run_env(cwd: &Path, args: &[&str], limit: Duration, env: &[(&str, &str)]) -> Out {
    let mut cmd = Command::new(BIN);
    cmd.args(args).envs(env.iter().copied()).current_dir(cwd);
    run_command(cmd, limit)
}

/// Runs `cmd` (a `clayflow` command line, or a launcher of one), killing it after `limit`;
/// the checkpoint test hook is unset unless `cmd` sets it.
pub fn run_command(mut cmd: Command, limit: Duration) -> Out {
    let start = Instant::now();
    let what = format!("{cmd:?}");
    if !cmd.get_envs().any(|(k, _)| k == checkpoint::TEST_PAUSE_ENV) {
        cmd.env_remove(checkpoint::TEST_PAUSE_ENV);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let out = drain(child.stdout.take().expect("stdout"));
    let err = drain(child.stderr.take().expect("stderr"));
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for clayflow") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.join().unwrap_or_default();
            let tail: String = {
                let lines: Vec<&str> = stderr.lines().collect();
                lines[lines.len().saturating_sub(10)..].join("\n")
            };
            panic!("{what} did not finish within {limit:?}; last stderr lines:\n{tail}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Out {
        code: status.code(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        secs: start.elapsed().as_secs_f64(),
    }
}

/// Runs `clayflow ARGS` in `cwd` under [`LIMIT`].
pub fn run(cwd: &Path, args: &[&str]) -> Out {
    run_in(cwd, args, LIMIT)
}
