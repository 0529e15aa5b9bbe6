//! A throwaway `lanyard serve --dev` child process, shared by `demo` and `bench`: start
//! this same binary on loopback with ephemeral ports, wait for its ready line, keep the
//! tail of its stderr for failure reports, and stop it with SIGTERM.
//!
//! ## Why a child process
//! Both commands run the real server exactly as an operator would start it, over the
//! real listeners, so what they show is what an operator gets. SIGTERM is sent with the
//! system `kill -TERM <pid>` command: tokio can only SIGKILL a child, and the workspace
//! forbids the `unsafe` a direct `libc::kill` call would need.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::output;

/// How long the server may take to print its ready line.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// How long the server may take to stop after SIGTERM.
const STOP_DEADLINE: Duration = Duration::from_secs(20);
/// How much of the server's stderr is kept for a failure report.
const STDERR_KEEP: usize = 64 * 1024;

/// The addresses the server announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// Workload gRPC address (host:port).
    pub grpc: String,
    /// HTTP address (host:port).
    pub http: String,
    /// Admin socket path.
    pub admin: PathBuf,
}

/// Parse `lanyard ready grpc=ADDR http=ADDR admin=PATH`.
pub fn parse_ready(line: &str) -> Option<Ready> {
    let rest = line.trim().strip_prefix("lanyard ready ")?;
    let (mut grpc, mut http, mut admin) = (None, None, None);
    // The admin path is last and may contain spaces.
    let (head, admin_path) = match rest.split_once(" admin=") {
        Some((h, a)) => (h, Some(a)),
        None => (rest, None),
    };
    if let Some(a) = admin_path {
        admin = Some(PathBuf::from(a));
    }
    for part in head.split_whitespace() {
        match part.split_once('=') {
            Some(("grpc", v)) => grpc = Some(v.to_string()),
            Some(("http", v)) => http = Some(v.to_string()),
            Some(("admin", v)) => admin = Some(PathBuf::from(v)),
            _ => {}
        }
    }
    Some(Ready {
        grpc: grpc?,
        http: http?,
        admin: admin?,
    })
}

/// A running `lanyard serve --dev` child. Dropping it kills the child (SIGKILL); call
/// [`DevServer::stop`] for a clean stop.
pub struct DevServer {
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
}

/// How the server ended after [`DevServer::stop`] when it did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    /// It had exited before it was asked to.
    #[error("the server had already exited ({0})")]
    AlreadyExited(ExitStatus),
    /// `kill -TERM` could not be run or failed; the child was killed instead.
    #[error("could not send SIGTERM to the server (`kill -TERM {0}` failed); killed it")]
    SignalFailed(u32),
    /// It exited unsuccessfully after SIGTERM.
    #[error("the server exited with {0} after SIGTERM")]
    BadExit(ExitStatus),
    /// It did not exit in time; the child was killed.
    #[error("the server did not stop within {}s of SIGTERM; killed it", STOP_DEADLINE.as_secs())]
    Timeout,
    /// Waiting for it failed.
    #[error("waiting for the server to stop")]
    Wait(#[source] std::io::Error),
}

impl DevServer {
    /// Start this binary as `serve --dev --data-dir <data_dir>` with ephemeral loopback
    /// ports and the admin socket at `<data_dir>/admin.sock`, without the caller's
    /// `LANYARD_*` environment. Returns once the server printed its ready line.
    ///
    /// # Errors
    /// When the binary cannot be found or started, exits early, or is not ready within
    /// the deadline (the child is killed then, and the tail of its stderr printed).
    pub async fn start(data_dir: &Path) -> anyhow::Result<(Self, Ready)> {
        let exe = std::env::current_exe().context("finding the lanyard binary")?;
        let mut cmd = Command::new(&exe);
        cmd.arg("serve")
            .arg("--dev")
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .arg("--admin-socket")
            .arg(data_dir.join("admin.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // The child must not depend on the caller's configuration.
        for (k, _) in std::env::vars_os() {
            if k.to_str().is_some_and(|k| k.starts_with("LANYARD_")) {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let mut server = Self {
            child,
            stderr: Arc::new(Mutex::new(Vec::new())),
        };
        if let Some(e) = server.child.stderr.take() {
            tokio::spawn(keep_tail(e, server.stderr.clone()));
        }
        match server.wait_ready().await {
            Ok(ready) => Ok((server, ready)),
            Err(e) => {
                let _ = server.child.start_kill();
                let _ = server.child.wait().await;
                server.report_stderr();
                Err(e)
            }
        }
    }

    /// The child's process ID, while it has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Print the kept tail of the server's stderr to our stderr, if there is any.
    pub fn report_stderr(&self) {
        let tail = self
            .stderr
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if !tail.trim().is_empty() {
            output::note(&format!(
                "--- server stderr ---\n{}\n--- end of server stderr ---",
                tail.trim_end()
            ));
        }
    }

    /// Read the child's stdout until the ready line, then keep draining it in the
    /// background.
    async fn wait_ready(&mut self) -> anyhow::Result<Ready> {
        let child = &mut self.child;
        let stdout = child
            .stdout
            .take()
            .context("the server's stdout is not piped")?;
        let mut lines = BufReader::new(stdout).lines();
        let found = tokio::time::timeout(READY_DEADLINE, async {
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) => {
                        if let Some(r) = parse_ready(&line) {
                            return Ok(r);
                        }
                    }
                    Ok(None) | Err(_) => {
                        let status = child.wait().await.context("waiting for the server")?;
                        anyhow::bail!("the server exited before it was ready ({status})");
                    }
                }
            }
        })
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the server did not print its ready line within {}s",
                READY_DEADLINE.as_secs()
            )
        })??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(found)
    }

    /// SIGTERM the child and wait for a clean exit.
    ///
    /// # Errors
    /// [`StopError`]; in every case the child is gone afterwards.
    pub async fn stop(&mut self) -> Result<(), StopError> {
        let child = &mut self.child;
        let Some(pid) = child.id() else {
            // Already reaped: it exited on its own, which nobody asked for.
            let status = child.wait().await.map_err(StopError::Wait)?;
            return Err(StopError::AlreadyExited(status));
        };
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stdin(Stdio::null())
            .status()
            .await;
        if !matches!(&sent, Ok(s) if s.success()) {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(StopError::SignalFailed(pid));
        }
        match tokio::time::timeout(STOP_DEADLINE, child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(StopError::BadExit(status)),
            Ok(Err(e)) => Err(StopError::Wait(e)),
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                Err(StopError::Timeout)
            }
        }
    }
}

/// Keep the last [`STDERR_KEEP`] bytes of a stream (draining it so the child never
/// blocks on a full pipe).
async fn keep_tail(mut r: impl AsyncRead + Unpin, buf: Arc<Mutex<Vec<u8>>>) {
    let mut chunk = [0u8; 8192];
    while let Ok(n) = r.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        if let Ok(mut b) = buf.lock() {
            b.extend_from_slice(&chunk[..n]);
            if b.len() > STDERR_KEEP {
                let cut = b.len() - STDERR_KEEP;
                b.drain(..cut);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_parses() {
        let r = parse_ready(
            "lanyard ready grpc=127.0.0.1:1 http=127.0.0.1:2 admin=/tmp/a b/admin.sock",
        )
        .unwrap();
        assert_eq!(r.grpc, "127.0.0.1:1");
        assert_eq!(r.http, "127.0.0.1:2");
        assert_eq!(r.admin, PathBuf::from("/tmp/a b/admin.sock"));
        assert!(parse_ready("lanyard is running").is_none());
        assert!(parse_ready("lanyard ready grpc=x").is_none());
    }
}
