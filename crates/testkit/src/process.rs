//! Start the real `lanyard` binary on loopback ports 0 with its own data directory and
//! talk to it over gRPC (workload TCP listener and admin Unix socket). The directory is
//! kept, and the server log printed, when the test fails.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use lanyard_proto::v1::admin_service_client::AdminServiceClient;
use lanyard_proto::v1::audit_service_client::AuditServiceClient;
use lanyard_proto::v1::exchange_service_client::ExchangeServiceClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::{Channel, Endpoint, Uri};

/// How to start lanyard.
#[derive(Debug, Clone, Default)]
pub struct LanyardOptions {
    /// `--dev`.
    pub dev: bool,
    /// Cedar policy text written to a file and named in the config.
    pub policy: Option<String>,
    /// Extra TOML appended to the generated config file.
    pub extra_config: String,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Use this PostgreSQL URL instead of the embedded SQLite store.
    pub postgres_url: Option<String>,
    /// Reuse this data directory (for restart tests) instead of a fresh one.
    pub data_dir: Option<PathBuf>,
}

/// A running lanyard process.
pub struct Lanyard {
    child: Option<tokio::process::Child>,
    dir: Option<tempfile::TempDir>,
    data_dir: PathBuf,
    /// `http://127.0.0.1:PORT` of the workload gRPC listener.
    pub grpc: String,
    /// `http://127.0.0.1:PORT` of the HTTP listener.
    pub http: String,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// What lanyard printed on stdout before it was ready (the `--dev` banner).
    pub banner: Vec<String>,
}

/// The `lanyard` binary next to the test executable (`target/<profile>/lanyard`).
pub fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("LANYARD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("lanyard");
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build -p lanyard-cli`",
        bin.display()
    );
    bin
}

impl Lanyard {
    /// Start lanyard and wait until it reports ready.
    pub async fn start(opts: LanyardOptions) -> Lanyard {
        let (dir, data_dir) = match &opts.data_dir {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("lanyard-test-")
                    .tempdir()
                    .unwrap();
                let d = t.path().join("data");
                (Some(t), d)
            }
        };
        let work = data_dir.parent().unwrap().to_path_buf();
        let mut config =
            String::from("[log]\nlevel = \"info,lanyard_server=debug,lanyard_trust=debug\"\n");
        if let Some(policy) = &opts.policy {
            let p = work.join("policy.cedar");
            std::fs::write(&p, policy).unwrap();
            config.push_str(&format!("[policy]\nfile = {:?}\n", p.display().to_string()));
        }
        if let Some(url) = &opts.postgres_url {
            config.push_str(&format!("[store]\nbackend = \"postgres\"\nurl = {url:?}\n"));
        }
        config.push_str(&opts.extra_config);
        let config_path = work.join("lanyard.toml");
        std::fs::write(&config_path, config).unwrap();
        let log_path = work.join("lanyard.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut cmd = tokio::process::Command::new(binary());
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--grpc-listen")
            .arg("127.0.0.1:0")
            .arg("--http-listen")
            .arg("127.0.0.1:0");
        if opts.dev {
            cmd.arg("--dev");
        }
        // The child sees only the LANYARD_* variables the test chose.
        for (k, _) in std::env::vars() {
            if k.starts_with("LANYARD_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut banner = Vec::new();
        let ready = tokio::time::timeout(crate::patience(), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix("lanyard ready ") {
                    return Some(rest.to_string());
                }
                banner.push(line);
            }
            None
        })
        .await;
        let Ok(Some(ready)) = ready else {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            panic!("lanyard did not become ready; its log:\n{log}");
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let mut grpc = String::new();
        let mut http = String::new();
        let mut admin = PathBuf::new();
        for part in ready.split(' ') {
            if let Some(v) = part.strip_prefix("grpc=") {
                grpc = format!("http://{v}");
            } else if let Some(v) = part.strip_prefix("http=") {
                http = format!("http://{v}");
            } else if let Some(v) = part.strip_prefix("admin=") {
                admin = PathBuf::from(v);
            }
        }
        Lanyard {
            child: Some(child),
            dir,
            data_dir,
            grpc,
            http,
            admin_socket: admin,
            banner,
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.parent().unwrap().join("lanyard.log"))
            .unwrap_or_default()
    }

    /// A client for the workload listener.
    pub async fn exchange(&self) -> ExchangeServiceClient<Channel> {
        ExchangeServiceClient::connect(self.grpc.clone())
            .await
            .unwrap()
    }

    /// A channel over the admin socket.
    pub async fn admin_channel(&self) -> Channel {
        uds_channel(&self.admin_socket).await.unwrap()
    }

    /// A client for the admin service.
    pub async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.admin_channel().await)
    }

    /// A client for the audit service.
    pub async fn audit(&self) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(self.admin_channel().await)
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(|c| c.id()).unwrap_or(0)
    }

    /// Send SIGTERM and wait for a clean exit; returns the exit status code.
    pub async fn stop(mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let pid = child.id()?;
        std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .expect("lanyard did not stop within 20s of SIGTERM")
            .unwrap();
        status.code()
    }

    /// Kill the process without warning (SIGKILL) and wait for it.
    pub async fn kill(mut self) -> PathBuf {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
        self.data_dir.clone()
    }

    /// Keep the temporary directory after this value is dropped (for restart tests).
    pub fn keep_dir(&mut self) -> PathBuf {
        if let Some(d) = self.dir.take() {
            return d.keep();
        }
        self.data_dir.parent().unwrap().to_path_buf()
    }
}

impl Drop for Lanyard {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        if std::thread::panicking() {
            eprintln!("---- lanyard log ----\n{}\n---- end ----", self.log());
            if let Some(d) = self.dir.take() {
                eprintln!("kept test directory {}", d.keep().display());
            }
        }
    }
}

/// A gRPC channel over a Unix socket.
pub async fn uds_channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
}
