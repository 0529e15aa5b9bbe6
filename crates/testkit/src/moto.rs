//! moto (a Python emulator of AWS, PROTOCOLS.md §3.4) in server mode on a free
//! loopback port, for the `aws-sts` destination's tests: started with
//! `python3 -m moto.server -H 127.0.0.1 -p PORT`, polled until it answers (with a
//! deadline, no fixed sleep), killed when dropped. Query API calls to it are signed
//! with SigV4 (`aws-sigv4`); moto routes signed requests by the credential scope's
//! service and does not check signatures.
//!
//! When moto is not importable [`Moto::start`] returns `None` and the test should
//! return early (skipped, with a note on stderr), unless `LANYARD_REQUIRE_MOTO` is set
//! (as `.ci/run` does after installing it): then it fails.

use std::process::Stdio;
use std::time::{Duration, UNIX_EPOCH};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use lanyard_core::{Clock, SystemClock};

/// The account moto uses by default.
pub const ACCOUNT: &str = "123456789012";
/// The `Content-Type` of Query API calls.
const FORM: &str = "application/x-www-form-urlencoded; charset=utf-8";

/// AWS credentials to sign with (moto accepts any).
#[derive(Debug, Clone)]
pub struct Keys {
    /// Access key ID.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Session token, for temporary credentials.
    pub session_token: Option<String>,
}

impl Keys {
    /// Long-term test credentials.
    pub fn admin() -> Keys {
        Keys {
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        }
    }

    /// These keys in AWS shared-credentials format, profile `default`.
    pub fn credentials_file_text(&self) -> String {
        let mut s = format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            self.access_key_id, self.secret_access_key
        );
        if let Some(t) = &self.session_token {
            s.push_str(&format!("aws_session_token = {t}\n"));
        }
        s
    }
}

/// A running moto server.
pub struct Moto {
    child: tokio::process::Child,
    url: String,
    http: reqwest::Client,
    /// Holds moto's log (stdout and stderr), printed if it fails to start.
    _dir: tempfile::TempDir,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Whether `python3` can import moto's server (`moto[server]`).
pub fn importable() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import moto.server, flask, werkzeug"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Moto {
    /// Start moto on a free loopback port and wait until it answers. `None` (skipped)
    /// when moto is not importable and `LANYARD_REQUIRE_MOTO` is not set.
    pub async fn start() -> Option<Moto> {
        if !importable() {
            assert!(
                std::env::var("LANYARD_REQUIRE_MOTO").is_err(),
                "LANYARD_REQUIRE_MOTO is set but python3 cannot import moto.server \
                 (python3 -m pip install 'moto[server]==5.2.1')"
            );
            eprintln!(
                "skipped: moto is not importable (python3 -m pip install 'moto[server]==5.2.1')"
            );
            return None;
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("moto.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = tokio::process::Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start moto");
        let mut moto = Moto {
            child,
            url: format!("http://127.0.0.1:{port}/"),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            _dir: dir,
        };
        // Poll until it answers, failing early if it exits; the deadline is the only wait.
        let probe = format!("{}moto-api/data.json", moto.url);
        let deadline = tokio::time::Instant::now() + crate::patience();
        loop {
            if let Some(status) = moto.child.try_wait().unwrap() {
                panic!(
                    "moto exited ({status}) before answering:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if let Ok(r) = moto.http.get(&probe).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "moto did not answer on {} in time:\n{}",
                moto.url,
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some(moto)
    }

    /// `http://127.0.0.1:PORT/`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// moto's whole state (`/moto-api/data.json`): STS assumed roles with their session
    /// name, policy and keys; IAM roles.
    pub async fn state(&self) -> serde_json::Value {
        self.http
            .get(format!("{}moto-api/data.json", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// POST a Query API call, signed with `keys` for `service` in `us-east-1`;
    /// returns the status and the XML body.
    pub async fn call(&self, service: &str, params: &[(&str, &str)], keys: &Keys) -> (u16, String) {
        let body = form(params);
        let headers = sign_headers(keys, service, &self.url, &body);
        let mut req = self
            .http
            .post(&self.url)
            .header("content-type", FORM)
            .body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    /// [`Moto::call`] that must succeed.
    pub async fn ok(&self, service: &str, params: &[(&str, &str)], keys: &Keys) -> String {
        let (status, body) = self.call(service, params, keys).await;
        assert_eq!(status, 200, "{params:?}: {body}");
        body
    }
}

/// The form body of `params`.
pub fn form(params: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (i, (k, v)) in params.iter().enumerate() {
        if i > 0 {
            s.push('&');
        }
        s.push_str(&enc(k));
        s.push('=');
        s.push_str(&enc(v));
    }
    s
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// SigV4 headers for a form POST of `body` to `url`, now.
pub fn sign_headers(keys: &Keys, service: &str, url: &str, body: &str) -> Vec<(String, String)> {
    let identity = Credentials::new(
        keys.access_key_id.clone(),
        keys.secret_access_key.clone(),
        keys.session_token.clone(),
        None,
        "lanyard-testkit",
    )
    .into();
    let now = u64::try_from(SystemClock.now_unix_millis()).unwrap();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region("us-east-1")
        .name(service)
        .time(UNIX_EPOCH + Duration::from_millis(now))
        .settings(SigningSettings::default())
        .build()
        .unwrap()
        .into();
    let req = SignableRequest::new(
        "POST",
        url,
        std::iter::once(("content-type", FORM)),
        SignableBody::Bytes(body.as_bytes()),
    )
    .unwrap();
    let (ins, _) = sign(req, &params).unwrap().into_parts();
    ins.headers()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The text of the first `<tag>` element in `xml` (entities `&quot;`, `&amp;`,
/// `&lt;`, `&gt;`, `&apos;` decoded).
pub fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    Some(
        xml[start..end]
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

/// Percent-decode `s` (IAM URL-encodes policy documents).
pub fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}
