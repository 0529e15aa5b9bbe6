//! The JSON-lines file sink: one event per line, appended and fsynced per batch,
//! rotated by size.
//!
//! Each line is
//! `{"seq":N,"time_ms":T,"kind":"...","prev_hash":"...","hash":"...","event":PAYLOAD}`
//! where `PAYLOAD` is the stored event text, verbatim, as the last member: a SIEM reads
//! it as structured JSON, and an auditor can take the exact bytes the hash covers (from
//! `"event":` to the final `}`) and check the chain from the file alone.
//!
//! Rotation: before a batch would take the file past `max_bytes`, `audit.jsonl` becomes
//! `audit.jsonl.1`, `.1` becomes `.2` and so on; the oldest beyond `keep` is deleted.
//! Where delivery resumes is read from the file itself (its last complete line), so the
//! file never holds an event twice. A line cut short by a crash is removed first.
//!
//! Written by hand rather than with a log-rotation crate: delivery needs to know
//! exactly which event is durable at the sink (fsync per batch, resume from the last
//! line), which the appender crates do not expose.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lanyard_store::AuditRecord;
use tokio::sync::Mutex;

use super::{Sink, SinkError};

/// The file sink's name.
pub const NAME: &str = "file";
/// How much of a file's end is read to find its last line.
const TAIL_BYTES: u64 = 1 << 20;

/// Appends events to a JSON-lines file.
pub struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    state: Arc<Mutex<Option<File>>>,
}

impl FileSink {
    /// A sink writing `path`, rotating past `max_bytes`, keeping `keep` rotated files.
    /// Nothing is opened until the first delivery.
    pub fn new(path: PathBuf, max_bytes: u64, keep: usize) -> Self {
        Self {
            path,
            max_bytes: max_bytes.max(4096),
            keep: keep.max(1),
            state: Arc::new(Mutex::new(None)),
        }
    }

    fn err(&self, what: &str, e: &std::io::Error) -> SinkError {
        SinkError {
            sink: NAME.into(),
            message: format!("{what} {}: {e}", self.path.display()),
        }
    }
}

/// One event as a line (with its newline).
pub fn line(r: &AuditRecord) -> String {
    let kind = serde_json::to_string(&r.kind).unwrap_or_else(|_| "\"\"".into());
    let prev = serde_json::to_string(&r.prev_hash).unwrap_or_else(|_| "\"\"".into());
    let hash = serde_json::to_string(&r.hash).unwrap_or_else(|_| "\"\"".into());
    format!(
        "{{\"seq\":{},\"time_ms\":{},\"kind\":{kind},\"prev_hash\":{prev},\"hash\":{hash},\"event\":{}}}\n",
        r.seq, r.time_ms, r.payload
    )
}

/// The sequence number at the start of a line written by [`line`].
fn seq_of(line: &[u8]) -> Option<i64> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

fn open_append(path: &Path) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        o.mode(0o600);
    }
    o.open(path)
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
}

/// The last complete line's seq in `path`, cutting off a partial last line. `None` when
/// the file is missing or holds no complete line.
fn last_seq(path: &Path) -> std::io::Result<Option<i64>> {
    let mut f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let start = len.saturating_sub(TAIL_BYTES);
    f.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail)?;
    // A crash mid-write leaves a line without its newline: cut it off.
    let complete = tail.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if complete < tail.len() {
        f.set_len(start + complete as u64)?;
        f.sync_all()?;
        tail.truncate(complete);
    }
    let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
    let last = body.rsplit(|b| *b == b'\n').next().unwrap_or(body);
    if last.is_empty() {
        return Ok(None);
    }
    seq_of(last).map(Some).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "its last line is not an audit event written by lanyard",
        )
    })
}

#[async_trait::async_trait]
impl Sink for FileSink {
    fn name(&self) -> &str {
        NAME
    }

    async fn resume_after(&self) -> Result<i64, SinkError> {
        let path = self.path.clone();
        let r = tokio::task::spawn_blocking(move || -> std::io::Result<i64> {
            if let Some(s) = last_seq(&path)? {
                return Ok(s);
            }
            // Just rotated: the newest event is in `.1`.
            Ok(last_seq(&rotated(&path, 1))?.unwrap_or(0))
        })
        .await
        .map_err(|e| SinkError {
            sink: NAME.into(),
            message: format!("reading {}: {e}", self.path.display()),
        })?;
        r.map_err(|e| self.err("reading", &e))
    }

    async fn deliver(&self, events: &[AuditRecord]) -> Result<(), SinkError> {
        let text: String = events.iter().map(line).collect();
        let (path, max_bytes, keep) = (self.path.clone(), self.max_bytes, self.keep);
        let state = self.state.clone();
        let r = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut guard = state.blocking_lock();
            if guard.is_none() {
                *guard = Some(open_append(&path)?);
            }
            let size = guard
                .as_ref()
                .map_or(Ok(0), |f| f.metadata().map(|m| m.len()))?;
            if size > 0 && size + text.len() as u64 > max_bytes {
                *guard = None;
                let _ = std::fs::remove_file(rotated(&path, keep));
                for n in (1..keep).rev() {
                    let from = rotated(&path, n);
                    if from.exists() {
                        std::fs::rename(&from, rotated(&path, n + 1))?;
                    }
                }
                std::fs::rename(&path, rotated(&path, 1))?;
                sync_dir(&path);
                *guard = Some(open_append(&path)?);
                sync_dir(&path);
            }
            let f = guard
                .as_mut()
                .ok_or_else(|| std::io::Error::other("no open file"))?;
            let written = f.write_all(text.as_bytes()).and_then(|()| f.sync_data());
            if written.is_err() {
                // Reopen next time; a partial line is cut off by `resume_after`.
                *guard = None;
            }
            written
        })
        .await
        .map_err(|e| SinkError {
            sink: NAME.into(),
            message: format!("writing {}: {e}", self.path.display()),
        })?;
        r.map_err(|e| self.err("writing", &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: i64) -> AuditRecord {
        AuditRecord {
            seq,
            time_ms: 1_700_000_000_000 + seq,
            kind: "exchange.granted".into(),
            payload: format!("{{\"kind\":\"exchange.granted\",\"n\":{seq}}}"),
            prev_hash: "0".repeat(64),
            hash: format!("{seq:064}"),
        }
    }

    #[test]
    fn a_line_is_json_with_the_payload_verbatim() {
        let r = rec(7);
        let l = line(&r);
        assert!(l.ends_with("}\n"));
        let v: serde_json::Value = serde_json::from_str(l.trim_end()).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["event"]["n"], 7);
        let exact = &l[l.find("\"event\":").unwrap() + 8..l.len() - 2];
        assert_eq!(
            exact, r.payload,
            "the hashed bytes can be cut out of the line"
        );
        assert_eq!(seq_of(l.as_bytes()), Some(7));
        assert_eq!(seq_of(b"{\"seq\":x"), None);
    }

    #[tokio::test]
    async fn appends_resumes_rotates_and_cuts_partial_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let sink = FileSink::new(path.clone(), 4096, 2);
        assert_eq!(sink.resume_after().await.unwrap(), 0);
        sink.deliver(&(1..=3).map(rec).collect::<Vec<_>>())
            .await
            .unwrap();
        assert_eq!(sink.resume_after().await.unwrap(), 3);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }

        // A crash mid-line: the partial line is cut off and delivery resumes after 3.
        let mut f = open_append(&path).unwrap();
        f.write_all(b"{\"seq\":4,\"time_ms\":1,\"ki").unwrap();
        drop(f);
        let again = FileSink::new(path.clone(), 4096, 2);
        assert_eq!(again.resume_after().await.unwrap(), 3);
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("}\n"));

        // Rotation by size; the newest event is found in `.1` right after a rotation.
        let mut seq = 4;
        while !rotated(&path, 2).exists() {
            again.deliver(&[rec(seq)]).await.unwrap();
            seq += 1;
        }
        assert!(!rotated(&path, 3).exists(), "keep = 2");
        assert_eq!(again.resume_after().await.unwrap(), seq - 1);
        let mut seqs = Vec::new();
        for p in [rotated(&path, 2), rotated(&path, 1), path.clone()] {
            for l in std::fs::read_to_string(&p).unwrap().lines() {
                seqs.push(seq_of(l.as_bytes()).unwrap());
            }
        }
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "contiguous: {seqs:?}"
        );
        assert_eq!(*seqs.last().unwrap(), seq - 1);
        assert!(
            std::fs::metadata(&path).unwrap().len() <= 4096,
            "files stay under max_bytes"
        );

        // Not a lanyard file: an error, not a silent restart from 0.
        std::fs::write(&path, "hello\n").unwrap();
        assert!(again.resume_after().await.is_err());
    }
}
