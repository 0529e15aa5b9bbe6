//! Regenerates the checked-in code in `src/gen` from `proto/` and fails on a difference,
//! so the generated code can never drift from the proto. Run with `LANYARD_BLESS=1` to
//! rewrite `src/gen` after changing a `.proto` file.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use prost::Message;

/// Messages that carry secrets: their `Debug` is hand-written in `src/lib.rs` to redact.
const SECRET_MESSAGES: &[&str] = &[
    ".lanyard.v1.ExchangeRequest",
    ".lanyard.v1.RenewRequest",
    ".lanyard.v1.ReleaseRequest",
    ".lanyard.v1.ExplainRequest",
    ".lanyard.v1.BearerToken",
    ".lanyard.v1.AwsCredentials",
    ".lanyard.v1.DatabaseCredentials",
    ".lanyard.v1.FingerprintRequest",
    ".lanyard.v1.IntrospectRequest",
    ".lanyard.v1.PutDestinationSecretRequest",
];

fn generate(out: &Path) -> Vec<u8> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files =
        ["exchange.proto", "admin.proto", "audit.proto"].map(|f| root.join("lanyard/v1").join(f));
    let fds = protox::compile(files, [&root]).expect("proto compiles");
    let descriptor = fds.encode_to_vec();
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .server_mod_attribute(".", r#"#[cfg(feature = "server")]"#)
        .client_mod_attribute(".", r#"#[cfg(feature = "client")]"#)
        .skip_debug(SECRET_MESSAGES.iter().copied())
        .emit_rerun_if_changed(false)
        .out_dir(out)
        .compile_fds(fds)
        .expect("code generation");
    descriptor
}

#[test]
fn generated_code_is_up_to_date() {
    let tmp = tempfile::tempdir().unwrap();
    let descriptor = generate(tmp.path());
    let gen_dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gen");
    let code = std::fs::read_to_string(tmp.path().join("lanyard.v1.rs")).unwrap();
    let bless = std::env::var_os("LANYARD_BLESS").is_some();
    let want_code = gen_dir.join("lanyard.v1.rs");
    let want_desc = gen_dir.join("descriptor.bin");
    if bless {
        std::fs::create_dir_all(&gen_dir).unwrap();
        std::fs::write(&want_code, &code).unwrap();
        std::fs::write(&want_desc, &descriptor).unwrap();
        return;
    }
    let have_code = std::fs::read_to_string(&want_code).unwrap_or_default();
    let have_desc = std::fs::read(&want_desc).unwrap_or_default();
    assert!(
        have_code == code && have_desc == descriptor,
        "src/gen is stale: run `LANYARD_BLESS=1 cargo test -p lanyard-proto --test bootstrap`"
    );
}
