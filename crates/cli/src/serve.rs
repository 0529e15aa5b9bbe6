//! `lanyard serve`: load configuration (defaults, file, `LANYARD_*` env, flags), validate
//! it, start logging and hand over to `lanyard_server::serve`.

use std::path::PathBuf;

use lanyard_server::{FileConfig, FlagOverrides, ServeOptions};

use crate::args::ServeArgs;

/// Client-side variables: they configure client commands, not the server's file config.
/// (`LANYARD_ADMIN_SOCKET` reaches `serve` as its `--admin-socket` flag instead.)
const CLIENT_ENV: &[&str] = &["LANYARD_ADMIN_SOCKET", "LANYARD_GRPC", "LANYARD_OUTPUT"];

/// The `LANYARD_*` environment for the config loader, client variables left out.
/// Variables that are not valid Unicode are skipped rather than panicking.
pub fn server_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with("LANYARD_") && !CLIENT_ENV.contains(&k.as_str()))
        .collect()
}

/// The flag layer of the configuration.
pub fn flag_overrides(
    a: &ServeArgs,
    admin_socket: Option<PathBuf>,
    data_dir: Option<PathBuf>,
) -> FlagOverrides {
    FlagOverrides {
        data_dir,
        grpc_listen: a.grpc_listen.clone(),
        http_listen: a.http_listen.clone(),
        admin_socket: admin_socket.map(|p| p.to_string_lossy().into_owned()),
        policy_file: a
            .policy_file
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned()),
        proxy_listen: a.proxy_listen.clone(),
    }
}

/// `lanyard serve`. `admin_socket` is the global `--admin-socket`, which for `serve`
/// says where to listen.
///
/// # Errors
/// Bad configuration or a startup failure, with context.
pub async fn serve(a: &ServeArgs, admin_socket: Option<PathBuf>) -> anyhow::Result<()> {
    // `--dev` without `--data-dir`: a throwaway directory, removed when serve returns.
    // The TempDir must live until then.
    let throwaway = match (&a.data_dir, a.dev) {
        (None, true) => Some(
            tempfile::Builder::new()
                .prefix("lanyard-dev-")
                .tempdir()
                .map_err(|e| anyhow::anyhow!("creating a throwaway data directory: {e}"))?,
        ),
        _ => None,
    };
    let data_dir = a
        .data_dir
        .clone()
        .or_else(|| throwaway.as_ref().map(|t| t.path().to_path_buf()));
    let flags = flag_overrides(a, admin_socket, data_dir);
    let cfg = FileConfig::load(a.config.as_deref(), &server_env(), &flags)?.validate()?;
    lanyard_server::telemetry::init(&cfg.log, cfg.telemetry.as_ref())?;
    if let Some(t) = &throwaway {
        tracing_note(&format!(
            "--dev: state lives in the throwaway directory {} (removed on exit)",
            t.path().display()
        ));
    }
    let result = lanyard_server::serve(cfg, ServeOptions { dev: a.dev }).await;
    drop(throwaway);
    result
}

fn tracing_note(msg: &str) {
    crate::output::note(&format!("lanyard: {msg}"));
}
