//! The `lanyard` binary: `lanyard serve` and every client and admin command (exchange,
//! renew, release, issuers, trust rules, destinations, grants, explain, keys, audit), plus
//! the `demo` tour and the `bench` benchmark. Parsing lives in [`args`], connections in
//! [`client`], printing in [`output`]; each group of commands has its own module.

pub mod admin;
pub mod args;
pub mod audit;
pub mod bench;
pub mod client;
pub mod demo;
pub mod dev_server;
pub mod output;
pub mod policy;
pub mod revoke;
pub mod run;
pub mod serve;
pub mod workload;

pub use args::Cli;

use crate::args::{Command, DevCommand};
use crate::client::RpcError;

/// Run one parsed command line.
///
/// # Errors
/// Whatever the command fails with; [`error_line`] renders it for the user.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let g = &cli.global;
    match &cli.command {
        Command::Serve(a) => serve::serve(a, g.admin_socket.clone()).await,
        Command::Dev(DevCommand::Token(a)) => workload::dev_token(a),
        Command::Exchange(a) => workload::exchange(g, a).await,
        Command::Renew(a) => workload::renew(g, a).await,
        Command::Release(a) => workload::release(g, a).await,
        Command::Run(a) => run::run(g, a).await,
        Command::Issuer(c) => admin::issuer(g, c).await,
        Command::TrustRule(c) => admin::trust_rule(g, c).await,
        Command::Destination(c) => admin::destination(g, c).await,
        Command::Grants(c) => admin::grants(g, c).await,
        Command::Revoke(a) => revoke::revoke(g, a).await,
        Command::Deny(c) => revoke::deny(g, c).await,
        Command::Inventory(a) => revoke::inventory(g, a).await,
        Command::Explain(a) => admin::explain(g, a).await,
        Command::Keys(c) => admin::keys(g, c).await,
        Command::Policy(c) => policy::policy(g, c).await,
        Command::Audit(c) => audit::audit(g, c).await,
        Command::Demo => demo::demo().await,
        Command::Bench(a) => bench::bench(g, a).await,
    }
}

/// The one line printed on failure: `error: <message> (reason: <REASON>)`, the reason
/// part present when the server gave one.
pub fn error_line(e: &anyhow::Error) -> String {
    let message = chain_message(e);
    let rpc = e.chain().find_map(|c| c.downcast_ref::<RpcError>());
    match rpc.and_then(|r| r.reason) {
        Some(reason) => format!("error: {message} (reason: {reason})"),
        None => match rpc {
            Some(r) => format!("error: {message} (grpc: {:?})", r.code),
            None => format!("error: {message}"),
        },
    }
}

/// The error and its causes joined by `: `, leaving out a cause whose text the message
/// before it already ends with (errors that print their source and also return it).
fn chain_message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

/// Whether the failure is only that standard output was closed (`| head`).
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading key: {0}")]
    struct Loud(#[source] std::io::Error);

    #[test]
    fn a_cause_already_printed_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(Loud(io)).context("minting");
        assert_eq!(error_line(&e), "error: minting: reading key: no such file");
    }
}
