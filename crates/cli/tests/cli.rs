//! Parse-level tests of the `lanyard` command line: no server needed.

use std::path::PathBuf;

use clap::{CommandFactory, Parser};
use lanyard_cli::args::{
    AuditCommand, Cli, Command, DestinationCommand, DevCommand, GrantStatusArg, GrantsCommand,
    IssuerCommand, KeysCommand, OutputFormat, TrustRuleCommand, parse_key_value,
};
use lanyard_proto::v1 as pb;

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("lanyard").chain(args.iter().copied()))
}

#[test]
fn the_command_definition_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn global_flags_have_defaults_and_work_after_the_subcommand() {
    let cli = parse(&["grants", "list"]).unwrap();
    assert_eq!(cli.global.grpc, "http://127.0.0.1:7600");
    assert_eq!(
        cli.global.admin_socket_or_default(),
        PathBuf::from("lanyard-data/admin.sock")
    );
    let cli = parse(&[
        "grants",
        "list",
        "--output",
        "json",
        "--admin-socket",
        "/tmp/x.sock",
    ])
    .unwrap();
    assert_eq!(cli.global.output, OutputFormat::Json);
    assert_eq!(cli.global.admin_socket, Some(PathBuf::from("/tmp/x.sock")));
    assert!(parse(&["--output", "yaml", "keys", "list"]).is_err());
}

#[test]
fn serve_takes_its_flags_and_the_admin_socket() {
    let cli = parse(&[
        "serve",
        "--dev",
        "--data-dir",
        "/tmp/d",
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--admin-socket",
        "/tmp/d/a.sock",
        "--policy-file",
        "p.cedar",
    ])
    .unwrap();
    let Command::Serve(s) = &cli.command else {
        panic!("not serve")
    };
    assert!(s.dev);
    assert_eq!(s.data_dir, Some(PathBuf::from("/tmp/d")));
    assert_eq!(s.grpc_listen.as_deref(), Some("127.0.0.1:0"));
    assert_eq!(
        cli.global.admin_socket,
        Some(PathBuf::from("/tmp/d/a.sock"))
    );
    let flags =
        lanyard_cli::serve::flag_overrides(s, cli.global.admin_socket.clone(), s.data_dir.clone());
    assert_eq!(flags.admin_socket.as_deref(), Some("/tmp/d/a.sock"));
    assert_eq!(flags.policy_file.as_deref(), Some("p.cedar"));
}

#[test]
fn dev_token_defaults_its_ttl() {
    let cli = parse(&["dev", "token", "--data-dir", "d", "--subject", "s"]).unwrap();
    let Command::Dev(DevCommand::Token(t)) = &cli.command else {
        panic!("not dev token")
    };
    assert_eq!(t.ttl, 600);
    assert_eq!(t.task, None);
    assert!(
        parse(&[
            "dev",
            "token",
            "--data-dir",
            "d",
            "--subject",
            "s",
            "--ttl",
            "0"
        ])
        .is_err()
    );
}

#[test]
fn exchange_collects_scopes() {
    let cli = parse(&[
        "exchange",
        "--token-file",
        "-",
        "--destination",
        "orders",
        "--scope",
        "read",
        "--scope",
        "write",
        "--ttl",
        "60",
    ])
    .unwrap();
    let Command::Exchange(e) = &cli.command else {
        panic!("not exchange")
    };
    assert_eq!(e.token.token_file, PathBuf::from("-"));
    assert_eq!(e.scopes, ["read", "write"]);
    assert_eq!(e.ttl, Some(60));
    assert!(
        parse(&["exchange", "--destination", "orders"]).is_err(),
        "token file is required"
    );
}

#[test]
fn renew_and_release_need_exactly_one_grant_reference() {
    assert!(parse(&["release", "--token-file", "t"]).is_err());
    assert!(
        parse(&[
            "release",
            "--token-file",
            "t",
            "--grant",
            "g",
            "--grant-file",
            "f"
        ])
        .is_err()
    );
    assert!(parse(&["release", "--token-file", "t", "--grant-file", "f"]).is_ok());
    let cli = parse(&["renew", "--token-file", "t", "--grant", "g", "--ttl", "30"]).unwrap();
    let Command::Renew(r) = &cli.command else {
        panic!("not renew")
    };
    assert_eq!(lanyard_cli::workload::grant_id(&r.grant).unwrap(), "g");
}

#[test]
fn issuer_put_needs_one_key_source_and_builds_the_message() {
    let base = [
        "issuer",
        "put",
        "--name",
        "gh",
        "--issuer-url",
        "https://token.actions.githubusercontent.com",
        "--alg",
        "RS256,ES256",
        "--alg",
        "PS256",
        "--audience",
        "lanyard",
    ];
    assert!(parse(&base).is_err(), "a key source is required");
    let mut two = base.to_vec();
    two.extend(["--jwks-url", "https://a", "--discovery-url", "https://b"]);
    assert!(parse(&two).is_err(), "only one key source");
    let mut ok = base.to_vec();
    ok.extend([
        "--discovery-url",
        "https://b",
        "--replay-protection",
        "--max-age",
        "300",
    ]);
    let cli = parse(&ok).unwrap();
    let Command::Issuer(IssuerCommand::Put(p)) = &cli.command else {
        panic!("not issuer put")
    };
    let i = lanyard_cli::admin::issuer_from_args(p).unwrap();
    assert_eq!(i.allowed_algorithms, ["RS256", "ES256", "PS256"]);
    assert_eq!(
        i.keys,
        Some(pb::issuer::Keys::DiscoveryUrl("https://b".into()))
    );
    assert!(i.replay_protection);
    assert_eq!(i.max_token_age_seconds, 300);
    assert_eq!(i.leeway_seconds, 0, "0 leaves the server default");
    assert!(matches!(
        parse(&["issuer", "get", "gh"]).unwrap().command,
        Command::Issuer(IssuerCommand::Get { .. })
    ));
}

#[test]
fn trust_rule_conditions_parse() {
    let cli = parse(&[
        "trust-rule",
        "put",
        "--name",
        "ci",
        "--issuer",
        "gh",
        "--template",
        "spiffe://{trust_domain}/gh/{repository}",
        "--task-claim",
        "run_id",
        "--exact",
        "repository_owner=acme",
        "--glob",
        "ref=refs/heads/*",
        "--one-of",
        "environment=prod,staging",
        "--priority",
        "-5",
    ])
    .unwrap();
    let Command::TrustRule(TrustRuleCommand::Put(p)) = &cli.command else {
        panic!("not trust-rule put")
    };
    let r = lanyard_cli::admin::rule_from_args(p);
    assert_eq!(r.priority, -5);
    assert_eq!(r.task_claim, "run_id");
    use pb::claim_condition::Matcher;
    assert_eq!(r.conditions.len(), 3);
    assert_eq!(r.conditions[0].matcher, Some(Matcher::Exact("acme".into())));
    assert_eq!(r.conditions[1].claim, "ref");
    assert_eq!(
        r.conditions[2].matcher,
        Some(Matcher::OneOf(pb::StringList {
            values: vec!["prod".into(), "staging".into()]
        }))
    );
    assert!(
        parse(&[
            "trust-rule",
            "put",
            "--name",
            "x",
            "--issuer",
            "i",
            "--template",
            "t",
            "--exact",
            "novalue"
        ])
        .is_err()
    );
    assert!(matches!(
        parse(&["trust-rule", "list", "--issuer", "gh"])
            .unwrap()
            .command,
        Command::TrustRule(TrustRuleCommand::List { issuer: Some(_) })
    ));
}

#[test]
fn destination_settings_merge_json_over_strings() {
    let cli = parse(&[
        "destination",
        "put",
        "--name",
        "orders",
        "--kind",
        "jwt",
        "--scope",
        "read",
        "--label",
        "env=prod",
        "--setting",
        "audience=https://a",
        "--setting",
        "x=1",
        "--settings-json",
        r#"{"x": 2, "extra_claims": ["repository"]}"#,
    ])
    .unwrap();
    let Command::Destination(DestinationCommand::Put(p)) = &cli.command else {
        panic!("not destination put")
    };
    let s = lanyard_cli::admin::settings_from_args(p).unwrap();
    assert_eq!(
        serde_json::Value::Object(s),
        serde_json::json!({"audience": "https://a", "x": 2, "extra_claims": ["repository"]})
    );
    let d = lanyard_cli::admin::destination_from_args(p).unwrap();
    assert_eq!(d.labels.get("env").map(String::as_str), Some("prod"));
    assert!(d.settings.unwrap().fields.contains_key("audience"));

    let cli = parse(&[
        "destination",
        "put",
        "--name",
        "o",
        "--kind",
        "jwt",
        "--settings-json",
        "[1]",
    ])
    .unwrap();
    let Command::Destination(DestinationCommand::Put(p)) = &cli.command else {
        panic!("not destination put")
    };
    assert!(lanyard_cli::admin::settings_from_args(p).is_err());
}

#[test]
fn grants_list_filters_and_limits() {
    let cli = parse(&[
        "grants", "list", "--status", "active", "--limit", "10", "--all", "--task", "t",
    ])
    .unwrap();
    let Command::Grants(GrantsCommand::List(l)) = &cli.command else {
        panic!("not grants list")
    };
    assert_eq!(l.status, Some(GrantStatusArg::Active));
    let req = lanyard_cli::admin::grants_request(l);
    assert_eq!(
        (req.status.as_str(), req.page_size, req.task_id.as_str()),
        ("active", 10, "t")
    );
    assert!(parse(&["grants", "list", "--status", "bogus"]).is_err());
    assert!(parse(&["grants", "list", "--limit", "0"]).is_err());
    assert!(parse(&["grants", "list", "--limit", "1001"]).is_err());
}

#[test]
fn keys_and_audit_parse() {
    let cli = parse(&["keys", "rotate"]).unwrap();
    assert!(matches!(
        cli.command,
        Command::Keys(KeysCommand::Rotate { activate_after: 0 })
    ));
    let cli = parse(&[
        "audit",
        "tail",
        "-f",
        "--after",
        "7",
        "--kind",
        "exchange.denied",
    ])
    .unwrap();
    let Command::Audit(AuditCommand::Tail(t)) = &cli.command else {
        panic!("not audit tail")
    };
    let w = lanyard_cli::audit::watch_request(t);
    assert!(w.follow);
    assert_eq!((w.after_seq, w.kind.as_str()), (7, "exchange.denied"));
    let Command::Audit(AuditCommand::Verify(v)) = parse(&[
        "audit",
        "verify",
        "--from-checkpoint",
        "a.jws",
        "--checkpoint",
        "b.jws",
        "--checkpoint",
        "c.jws",
    ])
    .unwrap()
    .command
    else {
        panic!("not audit verify")
    };
    assert_eq!(
        v.from_checkpoint.as_deref(),
        Some(std::path::Path::new("a.jws"))
    );
    assert_eq!(v.checkpoints.len(), 2);
    assert!(matches!(
        parse(&["audit", "fingerprint", "--token-file", "-"])
            .unwrap()
            .command,
        Command::Audit(AuditCommand::Fingerprint { .. })
    ));
    assert!(
        parse(&["audit", "fingerprint"]).is_err(),
        "the token comes from a file, so --token-file is required"
    );
    assert!(matches!(
        parse(&["audit", "checkpoint"]).unwrap().command,
        Command::Audit(AuditCommand::Checkpoint)
    ));
    assert!(matches!(parse(&["demo"]).unwrap().command, Command::Demo));
}

#[test]
fn bench_has_defaults_and_takes_its_flags() {
    let cli = parse(&["bench"]).unwrap();
    let Command::Bench(b) = &cli.command else {
        panic!("not bench")
    };
    assert_eq!(
        (b.duration, b.warmup, b.concurrency, b.floor_iterations),
        (10, 2, 32, 2000)
    );
    assert_eq!(cli.global.output, OutputFormat::Table);

    let cli = parse(&[
        "bench",
        "--duration",
        "3",
        "--warmup",
        "0",
        "--concurrency",
        "64",
        "--floor-iterations",
        "500",
        "--output",
        "json",
    ])
    .unwrap();
    let Command::Bench(b) = &cli.command else {
        panic!("not bench")
    };
    assert_eq!(
        (b.duration, b.warmup, b.concurrency, b.floor_iterations),
        (3, 0, 64, 500)
    );
    assert_eq!(cli.global.output, OutputFormat::Json);

    assert!(parse(&["bench", "--duration", "0"]).is_err());
    assert!(parse(&["bench", "--concurrency", "0"]).is_err());
    assert!(parse(&["bench", "--floor-iterations", "0"]).is_err());
    assert!(parse(&["bench", "--output", "csv"]).is_err());
}

#[test]
fn key_values_split_at_the_first_equals() {
    assert_eq!(
        parse_key_value("a=b=c").unwrap(),
        ("a".into(), "b=c".into())
    );
    assert_eq!(parse_key_value("a=").unwrap(), ("a".into(), String::new()));
    assert!(parse_key_value("=b").is_err());
    assert!(parse_key_value("ab").is_err());
}

#[test]
fn errors_carry_the_reason() {
    let e: anyhow::Error = lanyard_cli::client::RpcError {
        message: "scope admin is not offered by dev-api".into(),
        reason: Some(lanyard_core::ReasonCode::ScopeNotAllowed),
        code: tonic::Code::InvalidArgument,
    }
    .into();
    assert_eq!(
        lanyard_cli::error_line(&e),
        "error: scope admin is not offered by dev-api (reason: SCOPE_NOT_ALLOWED)"
    );
    let s = tonic::Status::unavailable("connection refused");
    let e = lanyard_cli::client::rpc_error(s, "http://127.0.0.1:1");
    assert_eq!(
        lanyard_cli::error_line(&e),
        "error: cannot reach lanyard at http://127.0.0.1:1: is `lanyard serve` running?"
    );
}

#[test]
fn policy_commands_parse() {
    use lanyard_cli::args::PolicyCommand;
    let Command::Policy(PolicyCommand::Put {
        file,
        activate,
        comment,
    }) = parse(&["policy", "put", "p.cedar", "--activate", "--comment", "why"])
        .unwrap()
        .command
    else {
        panic!("not policy put")
    };
    assert_eq!(file, std::path::PathBuf::from("p.cedar"));
    assert!(activate);
    assert_eq!(comment.as_deref(), Some("why"));
    assert!(matches!(
        parse(&["policy", "get"]).unwrap().command,
        Command::Policy(PolicyCommand::Get { name: None })
    ));
    assert!(matches!(
        parse(&["policy", "activate", "v3"]).unwrap().command,
        Command::Policy(PolicyCommand::Activate { name }) if name == "v3"
    ));
    assert!(matches!(
        parse(&["policy", "diff", "v1", "v2"]).unwrap().command,
        Command::Policy(PolicyCommand::Diff { from, to }) if from == "v1" && to == "v2"
    ));
    let Command::Policy(PolicyCommand::DryRun { since, .. }) =
        parse(&["policy", "dry-run", "p.cedar", "--since", "7d"])
            .unwrap()
            .command
    else {
        panic!("not policy dry-run")
    };
    assert_eq!(since.as_secs(), 7 * 86_400);
    assert!(parse(&["policy", "dry-run", "p.cedar", "--since", "soon"]).is_err());
    assert!(
        parse(&["policy", "activate"]).is_err(),
        "a version is required"
    );
}

#[test]
fn an_audit_line_is_readable() {
    use lanyard_proto::v1 as pb;
    let fp = format!("hmac-sha256:{}", "ab".repeat(32));
    let e = pb::AuditEvent {
        seq: 7,
        time: Some(prost_types::Timestamp {
            seconds: 1_795_000_000,
            nanos: 0,
        }),
        kind: "exchange.granted".into(),
        payload_json: serde_json::json!({
            "decision": "allow",
            "workload_id": "spiffe://lanyard.local/ci/builder",
            "subject_fingerprint": fp,
            "scopes": ["read", "write"],
            "policy_version": "v2",
        })
        .to_string(),
        ..Default::default()
    };
    let line = lanyard_cli::output::audit_line(&e);
    assert!(line.starts_with("     7  2026-"), "{line}");
    assert!(line.contains("exchange.granted"), "{line}");
    assert!(
        line.contains("workload_id=spiffe://lanyard.local/ci/builder"),
        "{line}"
    );
    assert!(line.contains("policy_version=v2"), "{line}");
    assert!(line.contains("scopes=read,write"), "{line}");
    assert!(
        line.contains("subject_fingerprint=hmac-sha256:abababababab…"),
        "{line}"
    );
    assert!(!line.contains(&fp), "long hashes are shortened: {line}");
}
