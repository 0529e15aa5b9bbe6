//! Startup and shutdown: open the store and keys, assemble the runtime, bind the three
//! listeners (workload gRPC, admin Unix socket, HTTP), run background work, and stop
//! gracefully on SIGTERM or Ctrl-C.

use lanyard_audit::Fingerprinter;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lanyard_core::{SharedClock, SystemClock};
use lanyard_keys::{KeyRing, KeyRingMinter};
use lanyard_policy::{Authorizer, CedarAuthorizer};
use lanyard_proto::v1::admin_service_server::AdminServiceServer;
use lanyard_proto::v1::audit_service_server::AuditServiceServer;
use lanyard_proto::v1::exchange_service_server::ExchangeServiceServer;
use lanyard_store::{ConfigKind, NewAuditEvent, NewConfigObject, Store};
use lanyard_trust::{Verifier, VerifierSettings};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tonic::transport::Server;

use crate::commit::Committer;
use crate::config::{Config, StoreBackend};
use crate::dev::{DEV_DESTINATION, DEV_ISSUER_NAME, DevIssuer, dev_objects};
use crate::http::{HttpState, router};
use crate::replay::StoreReplayGuard;
use crate::runtime::Runtime;
use crate::services::{AdminSvc, AuditSvc, ExchangeSvc};

/// How `serve` should start.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Development mode: dev issuer, trust rule, destination and policy.
    pub dev: bool,
}

/// Open the configured store.
///
/// # Errors
/// When the database cannot be opened or migrated.
pub async fn open_store(cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match &cfg.store {
        StoreBackend::Sqlite { path } => Arc::new(
            lanyard_store_sqlite::SqliteStore::open(path)
                .await
                .with_context(|| format!("opening SQLite store {}", path.display()))?,
        ),
        StoreBackend::Postgres {
            url,
            max_connections,
        } => Arc::new(
            lanyard_store_postgres::PgStore::connect(url, *max_connections)
                .await
                .context("connecting to PostgreSQL store")?,
        ),
    })
}

fn ensure_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {} to its owner", dir.display()))?;
    Ok(())
}

/// Bind the admin socket with owner-only permissions. A stale socket file (no one
/// listening) is removed; a live one is an error.
async fn bind_admin_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "admin socket {} is in use by another lanyard",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    if let Some(parent) = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty() && !p.exists())
    {
        ensure_private_dir(parent)?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding admin socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to its owner", path.display()))?;
    Ok(listener)
}

/// Load the policy from the configured file, or deny everything when none is set.
fn load_policy(cfg: &Config, dev: bool) -> anyhow::Result<Arc<dyn Authorizer>> {
    if let Some(path) = &cfg.policy_file {
        let a = CedarAuthorizer::from_file(path)
            .with_context(|| format!("loading policy file {}", path.display()))?;
        return Ok(Arc::new(a));
    }
    if dev {
        return Ok(Arc::new(
            CedarAuthorizer::from_text(lanyard_policy::DEV_POLICY, "dev-builtin")
                .context("loading the dev policy")?,
        ));
    }
    tracing::warn!("no [policy] file configured: every exchange is denied (default deny)");
    Ok(Arc::new(
        CedarAuthorizer::from_text("", "none").context("empty policy")?,
    ))
}

async fn put_if_absent(
    store: &dyn Store,
    kind: ConfigKind,
    name: &str,
    spec: serde_json::Value,
    clock: &SharedClock,
) -> anyhow::Result<()> {
    let now_ms = clock.now_unix_millis();
    let event = NewAuditEvent {
        time_ms: now_ms,
        kind: format!("{}.put", kind.as_str()),
        actor: Some("dev-bootstrap".into()),
        detail: serde_json::json!({"name": name, "after": spec}),
        ..NewAuditEvent::default()
    };
    store
        .config_put(
            NewConfigObject {
                kind,
                name: name.into(),
                spec,
                updated_by: "dev-bootstrap".into(),
                now: now_ms / 1000,
            },
            None,
            event,
        )
        .await?;
    Ok(())
}

/// Run lanyard until SIGTERM/SIGINT.
///
/// # Errors
/// Startup failures (bad config, store, keys, a port in use), with context.
pub async fn serve(mut cfg: Config, opts: ServeOptions) -> anyhow::Result<()> {
    let clock: SharedClock = SystemClock::shared();
    lanyard_keys::install_crypto_provider();
    ensure_private_dir(&cfg.data_dir)?;

    // Bind everything first, so a port in use fails fast and port 0 is resolved before
    // the issuer URL is derived from it.
    let grpc_listener = TcpListener::bind(cfg.grpc_listen)
        .await
        .with_context(|| format!("binding gRPC listener {}", cfg.grpc_listen))?;
    let http_listener = TcpListener::bind(cfg.http_listen)
        .await
        .with_context(|| format!("binding HTTP listener {}", cfg.http_listen))?;
    let admin_listener = bind_admin_socket(&cfg.admin_socket).await?;
    let proxy_listener = match cfg.proxy.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding proxy listener {addr}"))?,
        ),
        None => None,
    };
    if cfg.issuer_url_derived {
        cfg.issuer_url = format!("http://{}", http_listener.local_addr()?);
    }

    let store = open_store(&cfg).await?;

    let keys = Arc::new(
        KeyRing::open(
            &cfg.data_dir.join("keys"),
            cfg.signing.algorithm,
            clock.clone(),
        )
        .context("opening lanyard's signing keys")?,
    );
    keys.set_retire_after(cfg.signing.retire_after);
    keys.self_test().context("signing self-test")?;
    let minter = Arc::new(KeyRingMinter::new(keys.clone(), cfg.issuer_url.clone()));

    let settings = VerifierSettings {
        own_issuer_url: cfg.issuer_url.clone(),
        http_timeout: cfg.trust.http_timeout,
        max_jwks_bytes: cfg.trust.max_jwks_bytes,
        max_staleness: cfg.trust.max_staleness,
        refetch_cooldown: cfg.trust.refetch_cooldown,
        allow_http: cfg.trust.allow_http,
        ..VerifierSettings::new(cfg.issuer_url.clone())
    };
    let verifier = Verifier::new(
        settings,
        clock.clone(),
        Arc::new(StoreReplayGuard::new(store.clone(), clock.clone())),
    )
    .context("building the token verifier")?;

    let authorizer = load_policy(&cfg, opts.dev)?;
    let fingerprinter = Arc::new(
        Fingerprinter::open_or_create(&cfg.audit.hmac_key_file)
            .context("opening the audit fingerprint key")?,
    );
    let sealer = Arc::new(
        lanyard_keys::SealKey::open_or_create(&cfg.seal_key_file)
            .context("opening the seal key")?,
    );
    let committer = Committer::start(store.clone(), cfg.max_batch);
    let rt = Arc::new(Runtime::new(
        store.clone(),
        verifier,
        authorizer,
        keys.clone(),
        minter,
        clock.clone(),
        committer,
        cfg.trust_domain.clone(),
        fingerprinter,
        sealer,
    ));

    let dev = if opts.dev {
        let d = Arc::new(
            DevIssuer::open(
                &cfg.data_dir,
                &format!("http://{}/dev-issuer", http_listener.local_addr()?),
            )
            .context("creating the dev issuer")?,
        );
        let (issuer, rule, destination) = dev_objects(&d);
        put_if_absent(
            store.as_ref(),
            ConfigKind::Issuer,
            DEV_ISSUER_NAME,
            issuer,
            &clock,
        )
        .await?;
        put_if_absent(
            store.as_ref(),
            ConfigKind::TrustRule,
            DEV_ISSUER_NAME,
            rule,
            &clock,
        )
        .await?;
        put_if_absent(
            store.as_ref(),
            ConfigKind::Destination,
            DEV_DESTINATION,
            destination,
            &clock,
        )
        .await?;
        Some(d)
    } else {
        None
    };
    rt.reload(true)
        .await
        .map_err(|e| anyhow::anyhow!("loading configuration from the store: {e}"))?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let max = cfg.max_request_bytes;

    // Workload listener: ExchangeService, health, reflection. Nothing else.
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<ExchangeServiceServer<ExchangeSvc>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(lanyard_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("lanyard.v1.ExchangeService")
        .with_service_name("grpc.health.v1.Health")
        .build_v1()
        .context("building reflection")?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(lanyard_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("lanyard.v1.ExchangeService")
        .with_service_name("grpc.health.v1.Health")
        .build_v1alpha()
        .context("building reflection")?;
    let exchange =
        ExchangeServiceServer::new(ExchangeSvc { rt: rt.clone() }).max_decoding_message_size(max);
    let grpc_addr = grpc_listener.local_addr()?;
    let mut rx = shutdown_rx.clone();
    let grpc_task = tokio::spawn(
        Server::builder()
            .trace_fn(crate::telemetry::grpc_span)
            .add_service(health_svc.clone())
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(exchange)
            .serve_with_incoming_shutdown(
                // TCP_NODELAY: small gRPC responses must not wait for the peer's
                // delayed ACK (measured: ~44 ms per request without it). Coalescing:
                // responses finished together leave in one write (see `coalesce`).
                tokio_stream::StreamExt::map(
                    tonic::transport::server::TcpIncoming::from(grpc_listener)
                        .with_nodelay(Some(true)),
                    |conn| conn.map(crate::coalesce::Coalescing::new),
                ),
                async move {
                    let _ = rx.wait_for(|v| *v).await;
                },
            ),
    );

    // Admin listener: AdminService, AuditService, health, reflection. Unix socket only.
    let admin_reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(lanyard_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building reflection")?;
    let admin = AdminServiceServer::new(AdminSvc {
        rt: rt.clone(),
        own_issuer_url: cfg.issuer_url.clone(),
    })
    .max_decoding_message_size(max);
    let audit = AuditServiceServer::new(AuditSvc {
        rt: rt.clone(),
        issuer_url: cfg.issuer_url.clone(),
    })
    .max_decoding_message_size(max);
    let mut rx = shutdown_rx.clone();
    let admin_task = tokio::spawn(
        Server::builder()
            .trace_fn(crate::telemetry::grpc_span)
            .add_service(health_svc)
            .add_service(admin_reflection)
            .add_service(admin)
            .add_service(audit)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(admin_listener),
                async move {
                    let _ = rx.wait_for(|v| *v).await;
                },
            ),
    );

    let http_addr = http_listener.local_addr()?;
    let app = router(HttpState {
        rt: rt.clone(),
        issuer_url: cfg.issuer_url.clone(),
        dev: dev.clone(),
    });
    let mut rx = shutdown_rx.clone();
    let http_task = tokio::spawn(async move {
        axum::serve(http_listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.wait_for(|v| *v).await;
            })
            .await
    });

    // The broker for static-key destinations, when `[proxy] listen` is set.
    let (proxy_addr, proxy_task) = match proxy_listener {
        Some(listener) => {
            let addr = listener.local_addr()?;
            let proxy = crate::proxy::Proxy::new(rt.clone(), &cfg.proxy)
                .context("building the proxy's http client")?;
            let task = tokio::spawn(crate::proxy::serve(proxy, listener, shutdown_rx.clone()));
            (Some(addr), Some(task))
        }
        None => (None, None),
    };

    rt.revocations.set_settings(cfg.revocation.clone());
    let bg = tokio::spawn(background(rt.clone(), shutdown_rx.clone()));
    tokio::spawn(crate::audit::checkpoints(
        rt.clone(),
        cfg.issuer_url.clone(),
        cfg.audit.checkpoint_interval,
        shutdown_rx.clone(),
    ));
    rt.max_delegation_depth.store(
        cfg.max_delegation_depth,
        std::sync::atomic::Ordering::Relaxed,
    );
    tokio::spawn(crate::audit::head_metric(rt.clone(), shutdown_rx.clone()));
    let revoke_worker = {
        let mut rx = shutdown_rx.clone();
        tokio::spawn(crate::revoke::run_worker(rt.clone(), async move {
            let _ = rx.changed().await;
        }))
    };
    crate::audit::start_sinks(&rt, &cfg, &shutdown_rx)?;
    tokio::spawn(crate::audit::issuer_key_events(
        rt.clone(),
        Duration::from_secs(2),
        shutdown_rx.clone(),
    ));

    tracing::info!(
        grpc = %grpc_addr,
        http = %http_addr,
        admin_socket = %cfg.admin_socket.display(),
        store = store.backend(),
        issuer = %cfg.issuer_url,
        proxy = %proxy_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        "lanyard is serving"
    );
    if dev.is_some() {
        print_dev_banner(&cfg, grpc_addr, &cfg.admin_socket);
    }
    // A machine-readable line for scripts and tests that start lanyard on port 0.
    let proxy_part = proxy_addr
        .map(|a| format!(" proxy={a}"))
        .unwrap_or_default();
    println!(
        "lanyard ready grpc={grpc_addr} http={http_addr} admin={}{proxy_part}",
        cfg.admin_socket.display()
    );

    wait_for_signal().await;
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = grpc_task.await;
        let _ = admin_task.await;
        let _ = http_task.await;
        if let Some(t) = proxy_task {
            let _ = t.await;
        }
    })
    .await;
    bg.abort();
    revoke_worker.abort();
    let _ = std::fs::remove_file(&cfg.admin_socket);
    // Export the spans of the last requests before the process ends.
    crate::telemetry::shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Background work: pick up configuration changed through another replica, sweep
/// expired grants and token IDs in batches.
async fn background(rt: Arc<Runtime>, mut shutdown: watch::Receiver<bool>) {
    let mut reload = tokio::time::interval(Duration::from_secs(2));
    let mut sweep = tokio::time::interval(rt.revocations.settings().expiry_sweep);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = reload.tick() => {
                if let Err(e) = rt.reload(false).await {
                    tracing::warn!(error = %e, "configuration reload failed");
                }
            }
            _ = sweep.tick() => {
                // Destinations that leave state behind revoke their expired grants
                // first (a job takes them from active to expired), then the rest are
                // marked expired.
                crate::revoke::expiry_cleanup(&rt).await;
                let keep = match crate::revoke::kept_at_expiry(&rt).await {
                    Ok(k) => k,
                    Err(e) => {
                        tracing::warn!(error = %e, "expiry sweep skipped: destinations could not be read");
                        continue;
                    }
                };
                let now = rt.clock.now_unix();
                loop {
                    match rt.store.grant_expire_due(now, 1000, &keep).await {
                        Ok(1000) => continue,
                        Ok(_) => break,
                        Err(e) => { tracing::warn!(error = %e, "expiry sweep failed"); break; }
                    }
                }
                if let Err(e) = rt.store.jti_purge(now, 10_000).await {
                    tracing::warn!(error = %e, "replay cache purge failed");
                }
            }
        }
    }
}

fn print_dev_banner(cfg: &Config, grpc: std::net::SocketAddr, admin: &Path) {
    let exe = std::env::args()
        .next()
        .unwrap_or_else(|| "lanyard".to_string());
    let dd = cfg.data_dir.display();
    let token = cfg.data_dir.join("dev-token.jwt");
    let grant = cfg.data_dir.join("dev-grant-id");
    println!(
        "\nlanyard is running in --dev mode (throwaway store, built-in dev issuer).\n\
         Try it from another terminal:\n\n\
         # 1. mint a dev workload token (workload spiffe://{td}/dev/demo-agent, task run-1)\n\
         {exe} dev token --data-dir {dd} --subject demo-agent --task run-1 > {tok}\n\n\
         # 2. exchange it for a 5-minute credential at the dev-api destination\n\
         {exe} exchange --grpc http://{grpc} --token-file {tok} --destination dev-api --scope read --save-grant {gr}\n\n\
         # 3. list grants (admin socket)\n\
         {exe} grants list --admin-socket {adm}\n\n\
         # 4. release the grant now that the task is done\n\
         {exe} release --grpc http://{grpc} --token-file {tok} --grant-file {gr}\n",
        td = cfg.trust_domain,
        tok = token.display(),
        gr = grant.display(),
        adm = admin.display(),
    );
}
