//! The inline deny policy revocation keeps on the role (PROTOCOLS.md §3.3): one
//! statement per expiry hour denying every action to sessions whose
//! `aws:SourceIdentity` is a revoked grant, pruned once those sessions have all
//! expired, and AWS's own "revoke older sessions" statement as the fallback when the
//! per-grant statements would outgrow IAM's inline policy limit.
//!
//! ```json
//! {"Version": "2012-10-17", "Statement": [
//!   {"Sid": "LanyardRevokedUntil2026112405", "Effect": "Deny", "Action": "*", "Resource": "*",
//!    "Condition": {"StringEquals": {"aws:SourceIdentity": ["grt_0193...", "grt_0194..."]}}},
//!   {"Sid": "LanyardRevokedIssuedBefore", "Effect": "Deny", "Action": "*", "Resource": "*",
//!    "Condition": {"DateLessThan": {"aws:TokenIssueTime": "2026-11-24T03:00:00Z"}}}
//! ]}
//! ```
//!
//! A bucket `LanyardRevokedUntil<YYYYMMDDHH>` holds the grants whose credentials expire
//! before that hour (UTC) ends; it is dropped [`PRUNE_MARGIN_SECS`] after that. The
//! fallback is dropped once every session issued before its time has expired (at most
//! 12 h later). Statements whose `Sid` lanyard did not write are kept as they are.

use chrono::{DateTime, NaiveDateTime, Timelike};
use lanyard_core::UnixTime;
use serde_json::{Value, json};

use crate::settings::{MAX_SESSION_SECS, POLICY_VERSION};
use crate::wire::{iso, parse_time};

/// IAM's limit on an inline role policy, characters (whitespace excluded by IAM; the
/// document here has none).
pub const MAX_INLINE_POLICY_CHARS: usize = 10_240;
/// `Sid` prefix of the per-hour statements.
pub const BUCKET_SID_PREFIX: &str = "LanyardRevokedUntil";
/// `Sid` of the fallback statement.
pub const FALLBACK_SID: &str = "LanyardRevokedIssuedBefore";
/// A bucket is kept this long after its hour ends (clock skew between lanyard and AWS).
pub const PRUNE_MARGIN_SECS: i64 = 900;
/// The condition key of the per-grant statements.
pub const SOURCE_IDENTITY_KEY: &str = "aws:SourceIdentity";
/// The condition key of the fallback statement.
pub const TOKEN_ISSUE_TIME_KEY: &str = "aws:TokenIssueTime";

/// How a grant is blocked by the merged document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block {
    /// By its `aws:SourceIdentity`, in the statement `sid`.
    SourceIdentity {
        /// The statement.
        sid: String,
    },
    /// By the fallback: every session issued before `before`.
    IssuedBefore {
        /// Sessions issued before this are denied.
        before: UnixTime,
    },
}

/// The outcome of [`merge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// The document to write (compact JSON).
    pub document: String,
    /// Whether it differs from the one read (if not, nothing needs writing).
    pub changed: bool,
    /// How the grant is blocked.
    pub block: Block,
}

/// One per-hour bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bucket {
    end: UnixTime,
    grants: Vec<String>,
}

/// The end of the hour `t` falls in (`t` itself when it is on the hour).
fn hour_end(t: UnixTime) -> UnixTime {
    let rem = t.rem_euclid(3600);
    if rem == 0 {
        t
    } else {
        t.saturating_add(3600 - rem)
    }
}

fn bucket_sid(end: UnixTime) -> String {
    let stamp = DateTime::from_timestamp(end, 0)
        .map(|d| d.format("%Y%m%d%H").to_string())
        .unwrap_or_else(|| end.to_string());
    format!("{BUCKET_SID_PREFIX}{stamp}")
}

fn parse_bucket_sid(sid: &str) -> Option<UnixTime> {
    let stamp = sid.strip_prefix(BUCKET_SID_PREFIX)?;
    if stamp.len() != 10 || !stamp.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let t = NaiveDateTime::parse_from_str(&format!("{stamp}0000"), "%Y%m%d%H%M%S").ok()?;
    (t.minute() == 0).then(|| t.and_utc().timestamp())
}

fn deny(sid: &str, condition: Value) -> Value {
    json!({"Sid": sid, "Effect": "Deny", "Action": "*", "Resource": "*", "Condition": condition})
}

fn bucket_statement(b: &Bucket) -> Value {
    deny(
        &bucket_sid(b.end),
        json!({"StringEquals": {SOURCE_IDENTITY_KEY: b.grants}}),
    )
}

fn fallback_statement(before: UnixTime) -> Value {
    deny(
        FALLBACK_SID,
        json!({"DateLessThan": {TOKEN_ISSUE_TIME_KEY: iso(before)}}),
    )
}

/// Read one of lanyard's statements back: a bucket, or the fallback time.
enum Ours {
    Bucket(Bucket),
    Fallback(UnixTime),
}

fn read_ours(stmt: &Value) -> Option<Ours> {
    let sid = stmt.get("Sid")?.as_str()?;
    let cond = stmt.get("Condition")?;
    if sid == FALLBACK_SID {
        let t = cond
            .get("DateLessThan")?
            .get(TOKEN_ISSUE_TIME_KEY)?
            .as_str()?;
        return parse_time(t).map(Ours::Fallback);
    }
    let end = parse_bucket_sid(sid)?;
    let ids = cond.get("StringEquals")?.get(SOURCE_IDENTITY_KEY)?;
    let grants = match ids {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()?,
        _ => return None,
    };
    Some(Ours::Bucket(Bucket { end, grants }))
}

fn render(foreign: &[Value], buckets: &[Bucket], fallback: Option<UnixTime>) -> String {
    let mut statements: Vec<Value> = foreign.to_vec();
    statements.extend(buckets.iter().map(bucket_statement));
    statements.extend(fallback.map(fallback_statement));
    json!({"Version": POLICY_VERSION, "Statement": statements}).to_string()
}

/// The statements of a policy document.
fn statements_of(text: &str) -> Result<Vec<Value>, String> {
    let doc: Value = serde_json::from_str(text)
        .map_err(|_| "the existing deny policy is not JSON".to_owned())?;
    match doc.get("Statement") {
        Some(Value::Array(a)) => Ok(a.clone()),
        Some(o @ Value::Object(_)) => Ok(vec![o.clone()]),
        None => Ok(Vec::new()),
        Some(_) => Err("the existing deny policy has a malformed Statement".into()),
    }
}

/// Add `grant` (whose credentials expire at `expires_at`) to the deny document
/// `existing` (as read from IAM; `None` when the role has no such policy yet), pruning
/// what has expired at `now`. `written` is the document this process last wrote for
/// the role: IAM reads are eventually consistent, so a read right after a write may
/// miss it, and its grants are kept too. With `force_fallback` (IAM refused the last
/// document as too large) the per-grant statements are replaced by the fallback at
/// once.
///
/// # Errors
/// A message when `existing` is not a policy document, or when even the fallback does
/// not fit (statements lanyard did not write take the room).
pub fn merge(
    existing: Option<&str>,
    written: Option<&str>,
    grant: &str,
    expires_at: UnixTime,
    now: UnixTime,
    force_fallback: bool,
) -> Result<Merged, String> {
    let mut foreign = Vec::new();
    let mut buckets: Vec<Bucket> = Vec::new();
    let mut fallback: Option<UnixTime> = None;
    let mut before = None;
    let mut sources = Vec::new();
    if let Some(text) = existing {
        sources.push((statements_of(text)?, true));
    }
    if let Some(text) = written {
        // Statements lanyard did not write come from IAM's copy when there is one.
        sources.push((statements_of(text).unwrap_or_default(), existing.is_none()));
    }
    for (i, (statements, keep_foreign)) in sources.into_iter().enumerate() {
        for s in statements {
            match read_ours(&s) {
                Some(Ours::Bucket(b)) => match buckets.iter_mut().find(|x| x.end == b.end) {
                    Some(x) => x.grants.extend(b.grants),
                    None => buckets.push(b),
                },
                Some(Ours::Fallback(t)) => fallback = Some(fallback.map_or(t, |f| f.max(t))),
                None if keep_foreign => foreign.push(s),
                None => {}
            }
        }
        if i == 0 && existing.is_some() {
            before = Some(render(&foreign, &normalized(buckets.clone()), fallback));
        }
    }
    // Add the grant.
    let end = hour_end(expires_at);
    match buckets.iter_mut().find(|b| b.end == end) {
        Some(b) => b.grants.push(grant.to_owned()),
        None => buckets.push(Bucket {
            end,
            grants: vec![grant.to_owned()],
        }),
    }
    // Prune: every credential of a bucket has expired; every session issued before the
    // fallback time has expired (sessions last at most 12 h).
    buckets.retain(|b| b.end.saturating_add(PRUNE_MARGIN_SECS) >= now || b.end == end);
    let max_session = i64::try_from(MAX_SESSION_SECS).unwrap_or(i64::MAX);
    fallback = fallback.filter(|t| {
        t.saturating_add(max_session)
            .saturating_add(PRUNE_MARGIN_SECS)
            >= now
    });
    let buckets = normalized(buckets);
    let document = render(&foreign, &buckets, fallback);
    let (document, block) = if force_fallback || document.chars().count() > MAX_INLINE_POLICY_CHARS
    {
        // Every grant revoked so far was issued before now: one statement covers them.
        let t = fallback.map_or(now, |f| f.max(now));
        let doc = render(&foreign, &[], Some(t));
        if doc.chars().count() > MAX_INLINE_POLICY_CHARS {
            return Err(format!(
                "the deny policy would exceed IAM's {MAX_INLINE_POLICY_CHARS}-character limit even with one statement; it holds statements lanyard did not write"
            ));
        }
        (doc, Block::IssuedBefore { before: t })
    } else {
        (
            document,
            Block::SourceIdentity {
                sid: bucket_sid(end),
            },
        )
    };
    Ok(Merged {
        changed: before.as_deref() != Some(document.as_str()),
        document,
        block,
    })
}

/// Buckets in time order, each with its grants sorted and unique.
fn normalized(mut buckets: Vec<Bucket>) -> Vec<Bucket> {
    buckets.sort_by_key(|b| b.end);
    for b in &mut buckets {
        b.grants.sort();
        b.grants.dedup();
    }
    buckets
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3600;
    // 2026-11-24T03:00:00Z
    const T0: i64 = 1_795_489_200;

    fn grant(i: u32) -> String {
        format!("grt_{i:032x}")
    }

    fn statements(doc: &str) -> Vec<Value> {
        let v: Value = serde_json::from_str(doc).unwrap();
        assert_eq!(v["Version"], POLICY_VERSION);
        v["Statement"].as_array().unwrap().clone()
    }

    #[test]
    fn sids_name_the_hour_the_credentials_expire_by() {
        assert_eq!(iso(T0), "2026-11-24T03:00:00Z");
        assert_eq!(hour_end(T0), T0);
        assert_eq!(hour_end(T0 + 1), T0 + H);
        assert_eq!(bucket_sid(T0 + H), "LanyardRevokedUntil2026112404");
        assert_eq!(
            parse_bucket_sid("LanyardRevokedUntil2026112404"),
            Some(T0 + H)
        );
        assert_eq!(parse_bucket_sid("LanyardRevokedUntil20261124"), None);
        assert_eq!(parse_bucket_sid("LanyardRevokedUntil2026112425"), None);
    }

    #[test]
    fn first_revocation_creates_the_document() {
        let m = merge(None, None, &grant(1), T0 + 1800, T0, false).unwrap();
        assert!(m.changed);
        assert_eq!(
            m.block,
            Block::SourceIdentity {
                sid: "LanyardRevokedUntil2026112404".into()
            }
        );
        let s = statements(&m.document);
        assert_eq!(
            s,
            vec![json!({
                "Sid": "LanyardRevokedUntil2026112404", "Effect": "Deny", "Action": "*", "Resource": "*",
                "Condition": {"StringEquals": {"aws:SourceIdentity": [grant(1)]}}
            })]
        );
    }

    #[test]
    fn grants_merge_into_their_hour_and_twice_is_a_no_op() {
        let m1 = merge(None, None, &grant(2), T0 + 1800, T0, false).unwrap();
        let m2 = merge(Some(&m1.document), None, &grant(1), T0 + 3000, T0, false).unwrap();
        let m3 = merge(
            Some(&m2.document),
            None,
            &grant(3),
            T0 + 2 * H + 5,
            T0,
            false,
        )
        .unwrap();
        let s = statements(&m3.document);
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[0]["Condition"]["StringEquals"]["aws:SourceIdentity"],
            json!([grant(1), grant(2)])
        );
        assert_eq!(s[1]["Sid"], "LanyardRevokedUntil2026112406");
        // Revoking again changes nothing.
        let again = merge(
            Some(&m3.document),
            None,
            &grant(1),
            T0 + 3000,
            T0 + 60,
            false,
        )
        .unwrap();
        assert!(!again.changed);
        assert_eq!(again.document, m3.document);
        // IAM hands documents back reformatted; the comparison is on the content.
        let pretty =
            serde_json::to_string_pretty(&serde_json::from_str::<Value>(&m3.document).unwrap())
                .unwrap();
        assert!(
            !merge(Some(&pretty), None, &grant(3), T0 + 2 * H + 5, T0, false)
                .unwrap()
                .changed
        );
    }

    #[test]
    fn a_stale_read_does_not_lose_what_was_written() {
        let m1 = merge(None, None, &grant(1), T0 + 1800, T0, false).unwrap();
        // IAM still answers NoSuchEntity (or the older document) right after the write.
        let m2 = merge(None, Some(&m1.document), &grant(2), T0 + 1800, T0, false).unwrap();
        assert!(m2.changed);
        assert_eq!(
            statements(&m2.document)[0]["Condition"]["StringEquals"]["aws:SourceIdentity"],
            json!([grant(1), grant(2)])
        );
        // Statements lanyard did not write come from IAM's copy.
        let foreign = json!({"Sid": "Ops", "Effect": "Deny", "Action": "s3:*", "Resource": "*"});
        let iam = json!({"Version": POLICY_VERSION, "Statement": [foreign]}).to_string();
        let m3 = merge(
            Some(&iam),
            Some(&m2.document),
            &grant(3),
            T0 + 1800,
            T0,
            false,
        )
        .unwrap();
        let s = statements(&m3.document);
        assert_eq!(s[0], foreign);
        assert_eq!(
            s[1]["Condition"]["StringEquals"]["aws:SourceIdentity"],
            json!([grant(1), grant(2), grant(3)])
        );
        // Once IAM has caught up, nothing is rewritten.
        let m4 = merge(
            Some(&m3.document),
            Some(&m3.document),
            &grant(3),
            T0 + 1800,
            T0,
            false,
        )
        .unwrap();
        assert!(!m4.changed);
    }

    #[test]
    fn expired_buckets_and_fallbacks_are_pruned_and_foreign_statements_kept() {
        let foreign = json!({"Sid": "Ops", "Effect": "Deny", "Action": "s3:*", "Resource": "*"});
        let existing = json!({"Version": POLICY_VERSION, "Statement": [
            foreign,
            bucket_statement(&Bucket { end: T0, grants: vec![grant(1)] }),
            bucket_statement(&Bucket { end: T0 + H, grants: vec![grant(2)] }),
            fallback_statement(T0 - 12 * H - PRUNE_MARGIN_SECS - 1),
        ]})
        .to_string();
        // At T0 + margin + 1 the T0 bucket has gone; the T0+H one stays.
        let now = T0 + PRUNE_MARGIN_SECS + 1;
        let m = merge(Some(&existing), None, &grant(3), now + H, now, false).unwrap();
        let s = statements(&m.document);
        let sids: Vec<&str> = s.iter().map(|s| s["Sid"].as_str().unwrap()).collect();
        assert_eq!(
            sids,
            vec![
                "Ops",
                "LanyardRevokedUntil2026112404",
                "LanyardRevokedUntil2026112405"
            ]
        );
        assert_eq!(s[0], foreign);
        // A single-statement document (Statement an object) is read too.
        let single = json!({"Version": POLICY_VERSION, "Statement": bucket_statement(&Bucket { end: T0 + H, grants: vec![grant(9)] })}).to_string();
        let m = merge(Some(&single), None, &grant(8), T0 + 10, T0, false).unwrap();
        assert_eq!(
            statements(&m.document)[0]["Condition"]["StringEquals"]["aws:SourceIdentity"],
            json!([grant(8), grant(9)])
        );
        assert!(merge(Some("not json"), None, &grant(1), T0, T0, false).is_err());
    }

    #[test]
    fn an_oversized_document_falls_back_to_token_issue_time() {
        let mut doc: Option<String> = None;
        let mut fell_back = None;
        for i in 0..400 {
            let m = merge(doc.as_deref(), None, &grant(i), T0 + H, T0 + 10, false).unwrap();
            assert!(m.document.chars().count() <= MAX_INLINE_POLICY_CHARS);
            if let Block::IssuedBefore { before } = m.block {
                fell_back = Some((i, before));
                doc = Some(m.document);
                break;
            }
            doc = Some(m.document);
        }
        let (i, before) = fell_back.expect("the fallback kicks in");
        assert!(i > 200, "{i}");
        assert_eq!(before, T0 + 10);
        let s = statements(doc.as_deref().unwrap());
        assert_eq!(
            s,
            vec![json!({
                "Sid": FALLBACK_SID, "Effect": "Deny", "Action": "*", "Resource": "*",
                "Condition": {"DateLessThan": {"aws:TokenIssueTime": iso(T0 + 10)}}
            })]
        );
        // The next revocation starts a bucket again, beside the fallback.
        let m = merge(doc.as_deref(), None, &grant(1000), T0 + H, T0 + 20, false).unwrap();
        let s = statements(&m.document);
        assert_eq!(s.len(), 2);
        assert_eq!(s[1]["Sid"], FALLBACK_SID);
        // IAM refusing the document (LimitExceeded) forces the fallback.
        let m = merge(Some(&m.document), None, &grant(1001), T0 + H, T0 + 30, true).unwrap();
        assert_eq!(m.block, Block::IssuedBefore { before: T0 + 30 });
        assert_eq!(statements(&m.document).len(), 1);
        // Foreign statements too large for any fallback: an error.
        let big = json!({"Version": POLICY_VERSION, "Statement": [{"Sid": "Big", "Effect": "Deny", "Action": "*", "Resource": "x".repeat(MAX_INLINE_POLICY_CHARS)}]}).to_string();
        assert!(
            merge(Some(&big), None, &grant(1), T0, T0, false)
                .unwrap_err()
                .contains("did not write")
        );
    }
}
