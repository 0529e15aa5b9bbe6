//! Connecting to lanyard: the workload gRPC listener over TCP and the admin API over the
//! Unix socket, and turning a `tonic::Status` into an error that keeps its reason code.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use lanyard_core::ReasonCode;
use lanyard_proto::v1::admin_service_client::AdminServiceClient;
use lanyard_proto::v1::audit_service_client::AuditServiceClient;
use lanyard_proto::v1::exchange_service_client::ExchangeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// A refused or failed RPC: the server's message and its stable reason code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RpcError {
    /// The server's message (safe to show; never token text).
    pub message: String,
    /// The stable reason, when the server gave one.
    pub reason: Option<ReasonCode>,
    /// The gRPC code.
    pub code: tonic::Code,
}

/// lanyard could not be reached at all.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing answers at the address.
    #[error("cannot reach lanyard at {target}: is `lanyard serve` running?")]
    Unreachable {
        /// The URL or socket path tried.
        target: String,
    },
    /// The admin socket exists but this user may not use it.
    #[error(
        "permission denied on the admin socket {path}: the admin API is open only to the user running lanyard"
    )]
    PermissionDenied {
        /// Socket path.
        path: PathBuf,
    },
    /// The `--grpc` value is not a URL.
    #[error("--grpc {url:?} is not a valid URL: {message}")]
    BadUrl {
        /// What was given.
        url: String,
        /// Why it failed.
        message: String,
    },
}

/// Turn a status into an error, naming `target` when the server is simply not there.
pub fn rpc_error(status: tonic::Status, target: &str) -> anyhow::Error {
    let reason = lanyard_server::error::reason_of(&status);
    if reason.is_none() && status.code() == tonic::Code::Unavailable {
        return ConnectError::Unreachable {
            target: target.to_string(),
        }
        .into();
    }
    let message = if status.message().is_empty() {
        format!("the call failed ({:?})", status.code())
    } else {
        status.message().to_string()
    };
    RpcError {
        message,
        reason,
        code: status.code(),
    }
    .into()
}

/// Extension turning `Result<Response<T>, Status>` into `anyhow::Result<T>`.
pub trait RpcResultExt<T> {
    /// The response body, or an [`RpcError`].
    ///
    /// # Errors
    /// The status, converted by [`rpc_error`].
    fn or_rpc_error(self, target: &str) -> anyhow::Result<T>;
}

impl<T> RpcResultExt<T> for Result<tonic::Response<T>, tonic::Status> {
    fn or_rpc_error(self, target: &str) -> anyhow::Result<T> {
        self.map(tonic::Response::into_inner)
            .map_err(|s| rpc_error(s, target))
    }
}

/// Normalise a `--grpc` value: `127.0.0.1:7600` means `http://127.0.0.1:7600`.
pub fn grpc_url(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

/// A client of the workload listener.
///
/// # Errors
/// [`ConnectError`] when the URL is bad or nothing answers there.
pub async fn exchange_client(url: &str) -> anyhow::Result<ExchangeServiceClient<Channel>> {
    let url = grpc_url(url);
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| ConnectError::BadUrl {
            url: url.clone(),
            message: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint
        .connect()
        .await
        .map_err(|_| ConnectError::Unreachable { target: url })?;
    Ok(ExchangeServiceClient::new(channel))
}

/// The admin socket, as a target name for messages.
pub fn admin_target(path: &Path) -> String {
    format!("unix:{}", path.display())
}

/// A channel to the admin Unix socket.
///
/// # Errors
/// [`ConnectError`] when the socket is missing, refuses, or is not ours to use.
pub async fn admin_channel(path: &Path) -> anyhow::Result<Channel> {
    let p = path.to_path_buf();
    let endpoint = Endpoint::from_static("http://[::]:50051");
    let result = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await;
    match result {
        Ok(ch) => Ok(ch),
        Err(e) => {
            let denied =
                std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
                    e.source()
                })
                .filter_map(|e| e.downcast_ref::<std::io::Error>())
                .any(|io| io.kind() == std::io::ErrorKind::PermissionDenied);
            Err(if denied {
                ConnectError::PermissionDenied {
                    path: path.to_path_buf(),
                }
            } else {
                ConnectError::Unreachable {
                    target: admin_target(path),
                }
            }
            .into())
        }
    }
}

/// An admin client over the socket.
///
/// # Errors
/// As [`admin_channel`].
pub async fn admin_client(path: &Path) -> anyhow::Result<AdminServiceClient<Channel>> {
    // A revocation job's receipts list every grant they cover (5,000 per receipt at
    // most), so `revoke status --receipts` of a large job is a large message.
    Ok(AdminServiceClient::new(admin_channel(path).await?)
        .max_decoding_message_size(ADMIN_MAX_MESSAGE))
}

/// The largest admin response the CLI accepts.
pub const ADMIN_MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// An audit client over the socket.
///
/// # Errors
/// As [`admin_channel`].
pub async fn audit_client(path: &Path) -> anyhow::Result<AuditServiceClient<Channel>> {
    Ok(AuditServiceClient::new(admin_channel(path).await?))
}
