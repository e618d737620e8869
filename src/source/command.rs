//! The standard output of a command, run without a shell. A non-zero exit or a signal fails
//! the backup with the command's stderr in the error.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;

use super::{Source, Stats};
use crate::cancel::Cancel;
use crate::store::CHUNK_SIZE;
use crate::{Error, Result};

/// Keep this much of the command's stderr for the error message.
const STDERR_TAIL: usize = 16 * 1024;

pub struct CommandSource {
    argv: Vec<String>,
    artifact: String,
    env: BTreeMap<String, String>,
}

impl CommandSource {
    pub fn new(argv: Vec<String>, artifact: String, env: BTreeMap<String, String>) -> Self {
        CommandSource {
            argv,
            artifact,
            env,
        }
    }
}

impl Source for CommandSource {
    fn kind(&self) -> &'static str {
        "command"
    }
    fn artifact(&self) -> String {
        self.artifact.clone()
    }
    fn descriptor(&self) -> serde_json::Value {
        // Arguments may carry credentials; record the program only.
        serde_json::json!({ "program": self.argv[0], "artifact": self.artifact })
    }
    fn run(
        &mut self,
        out: &mut dyn Write,
        _index: Option<&mut dyn Write>,
        cancel: &Cancel,
    ) -> Result<Stats> {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..]).envs(&self.env);
        let streamed = stream_stdout(cmd, out, cancel)?;
        let mut stats = Stats::new();
        stats.insert("bytes".into(), streamed.bytes.into());
        Ok(stats)
    }
}

/// What a streamed command left behind.
pub struct Streamed {
    /// Bytes copied from its standard output.
    pub bytes: u64,
    /// The tail of its standard error.
    pub stderr: String,
}

/// Runs `cmd` (stdin closed), copies its standard output to `out` in large blocks, and
/// waits for it. A failed write, a cancellation, a non-zero exit or a signal is an error
/// naming the program with its stderr.
pub fn stream_stdout(mut cmd: Command, out: &mut dyn Write, cancel: &Cancel) -> Result<Streamed> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = spawn(&mut cmd, Stdio::null(), Stdio::piped())?;
    let stderr_thread = collect_stderr(&mut child);
    let mut stdout = child.stdout.take().expect("piped");
    enlarge_pipe(&stdout);
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut bytes = 0u64;
    let copied: Result<()> = loop {
        if let Err(e) = cancel.check() {
            break Err(e);
        }
        match stdout.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = out.write_all(&buf[..n]) {
                    break Err(Error::io("write", e));
                }
                bytes += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(Error::io(format!("read the output of `{program}`"), e)),
        }
    };
    if copied.is_err() {
        let _ = child.kill();
    }
    drop(stdout);
    let status = child
        .wait()
        .map_err(|e| Error::io(format!("wait for `{program}`"), e))?;
    let stderr = stderr_thread.join().unwrap_or_default();
    copied?;
    check_status(&program, status, &stderr)?;
    Ok(Streamed { bytes, stderr })
}

/// Grows a pipe from the default 64 KiB to 1 MiB (the default limit for unprivileged
/// users), so a tool streaming a dump writes ahead in large pieces instead of waking the
/// reader every 64 KiB. Left as it is where the kernel refuses.
fn enlarge_pipe(pipe: &impl std::os::fd::AsRawFd) {
    // SAFETY: F_SETPIPE_SZ only resizes the pipe behind a descriptor the caller owns.
    unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
}

/// Starts `cmd` with the given stdin and stdout and a piped stderr.
pub fn spawn(cmd: &mut Command, stdin: Stdio, stdout: Stdio) -> Result<Child> {
    cmd.stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            Error::failure(format!(
                "cannot run `{}`: {e}",
                cmd.get_program().to_string_lossy()
            ))
            .hint("check that the program is installed and on PATH")
        })
}

/// Waits for `child`; if the run is cancelled meanwhile, asks it to stop (SIGTERM, on which
/// the PostgreSQL and MariaDB tools cancel their queries), then kills it after 10 s.
pub fn wait_cancellable(child: &mut Child, program: &str, cancel: &Cancel) -> Result<ExitStatus> {
    let what = |e| Error::io(format!("wait for `{program}`"), e);
    let _tracked = crate::cancel::track_child(child.id());
    loop {
        if let Some(status) = child.try_wait().map_err(what)? {
            return Ok(status);
        }
        if cancel.is_cancelled() {
            // SAFETY: kill has no memory preconditions; the child has not been reaped, so
            // its PID is still its own.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while child.try_wait().map_err(what)?.is_none() {
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    child.wait().map_err(what)?;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            return Err(Error::cancelled());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Reads a child's piped stderr on a thread, keeping its tail.
pub fn collect_stderr(child: &mut Child) -> JoinHandle<String> {
    let mut stderr = child.stderr.take().expect("stderr is piped");
    std::thread::spawn(move || {
        let mut tail: Vec<u8> = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            tail.extend_from_slice(&buf[..n]);
            if tail.len() > 2 * STDERR_TAIL {
                tail.drain(..tail.len() - STDERR_TAIL);
            }
        }
        if tail.len() > STDERR_TAIL {
            tail.drain(..tail.len() - STDERR_TAIL);
        }
        String::from_utf8_lossy(&tail).trim().to_owned()
    })
}

/// Turns a non-zero exit or a signal into an error carrying the program's stderr.
pub fn check_status(program: &str, status: ExitStatus, stderr: &str) -> Result<()> {
    if status.success() {
        return Ok(());
    }
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "failed".to_owned(),
    };
    let detail = if stderr.is_empty() {
        "(no stderr)"
    } else {
        stderr
    };
    Err(Error::failure(format!(
        "command `{program}` {how}; stderr: {detail}"
    )))
}

/// A SQL client (`psql`, `mariadb`) on a pipe, for statements that must share one session:
/// a transaction's snapshot, a lock, a temporary replication slot. Dropping it without
/// [`SqlSession::close`] ends the client and waits for it.
pub struct SqlSession {
    program: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr: Option<JoinHandle<String>>,
    /// The client statement that prints [`END_MARK`] on a line of its own.
    end: String,
}

const END_MARK: &str = "__drctl_end_of_result__";

impl SqlSession {
    /// Starts `cmd`, a client that reads statements on stdin and prints each result's rows
    /// one per line; `end` gives its statement that prints a marker line.
    pub fn start(mut cmd: Command, end: impl Fn(&str) -> String) -> Result<SqlSession> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let mut child = spawn(&mut cmd, Stdio::piped(), Stdio::piped())?;
        let stderr = Some(collect_stderr(&mut child));
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        Ok(SqlSession {
            program,
            child,
            stdin,
            stdout,
            stderr,
            end: end(END_MARK),
        })
    }

    /// Runs one statement; returns its result rows, one line each.
    pub fn query(&mut self, sql: &str) -> Result<Vec<String>> {
        let sent = self.stdin.as_mut().map(|stdin| {
            stdin
                .write_all(format!("{sql};\n{}\n", self.end).as_bytes())
                .and_then(|_| stdin.flush())
        });
        if !matches!(sent, Some(Ok(()))) {
            return Err(self.failed());
        }
        let mut rows = Vec::new();
        loop {
            let mut line = String::new();
            match self.stdout.read_line(&mut line) {
                Ok(0) | Err(_) => return Err(self.failed()),
                Ok(_) => {}
            }
            let line = line.trim_end_matches('\n');
            if line == END_MARK {
                return Ok(rows);
            }
            rows.push(line.to_owned());
        }
    }

    /// Runs a query that returns one value.
    pub fn value(&mut self, sql: &str) -> Result<String> {
        let rows = self.query(sql)?;
        rows.into_iter()
            .next()
            .ok_or_else(|| Error::failure(format!("{}: no result for {sql:?}", self.program)))
    }

    /// Ends the session; fails if the client did.
    pub fn close(mut self) -> Result<()> {
        drop(self.stdin.take());
        let status = self
            .child
            .wait()
            .map_err(|e| Error::io(format!("wait for {}", self.program), e))?;
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        check_status(&self.program, status, &stderr)
    }

    fn failed(&mut self) -> Error {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let status = self.child.wait();
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        match status {
            Ok(status) if !status.success() && !stderr.is_empty() => {
                check_status(&self.program, status, &stderr).unwrap_err()
            }
            _ => Error::failure(format!(
                "{} session ended unexpectedly; stderr: {}",
                self.program,
                if stderr.is_empty() { "(none)" } else { &stderr }
            )),
        }
    }
}

impl Drop for SqlSession {
    fn drop(&mut self) {
        // A no-op after close() or a failure, which waited already.
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
