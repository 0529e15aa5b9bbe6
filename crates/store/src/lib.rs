//! The storage API: one [`Store`] trait (configuration objects, grants, replay cache,
//! audit chain) that `lanyard-store-sqlite` and `lanyard-store-postgres` implement, the
//! records it speaks in, [`StoreError`], the audit hash-chain rule, and (feature
//! `test-util`) the conformance suite both implementations must pass.

pub mod audit;
#[cfg(feature = "test-util")]
pub mod conformance;
mod records;

pub use audit::{
    AuditRecord, ChainLink, GENESIS_HASH, NewAuditEvent, chain_hash, hash_matches, link_after,
};
pub use records::*;

use async_trait::async_trait;
use lanyard_core::{GrantId, UnixTime};

/// Errors from a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for, e.g. `grant grt_...`.
        what: String,
    },
    /// A concurrent change won, or the object is not in the state the change needs.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database could not be reached or the transaction failed to commit;
    /// nothing was changed.
    #[error("store unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// Stored data could not be decoded (corruption or a migration bug).
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
}

/// `Result` with [`StoreError`].
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Everything lanyard keeps durably. Implementations must be safe to share between many
/// lanyard replicas using one database.
///
/// Every method that changes state takes the audit event(s) that record the change and
/// writes them in the same transaction, so nothing exists without its event.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Short name of the backend, e.g. `sqlite`.
    fn backend(&self) -> &'static str;

    // === configuration objects ===

    /// Create or replace a configuration object. When `expected_revision` is `Some`,
    /// the write only succeeds if the stored object has that revision (0 = must not exist).
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when `expected_revision` does not match;
    /// [`StoreError::Unavailable`].
    async fn config_put(
        &self,
        obj: NewConfigObject,
        expected_revision: Option<i64>,
        audit: NewAuditEvent,
    ) -> Result<ConfigObject>;

    /// One configuration object.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn config_get(&self, kind: ConfigKind, name: &str) -> Result<Option<ConfigObject>>;

    /// All objects of a kind, ordered by name.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn config_list(&self, kind: ConfigKind) -> Result<Vec<ConfigObject>>;

    /// Delete an object.
    ///
    /// # Errors
    /// [`StoreError::NotFound`], [`StoreError::Unavailable`].
    async fn config_delete(&self, kind: ConfigKind, name: &str, audit: NewAuditEvent)
    -> Result<()>;

    /// The highest revision over all configuration objects, including deletions. Cheap;
    /// replicas poll it to notice changes made through another replica.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn config_generation(&self) -> Result<i64>;

    // === grants ===

    /// Insert new grants and append audit events (denials, for instance) in one
    /// transaction. The group-commit path: many exchanges share one durable commit.
    /// Returns the sequence numbers given to `events`, in order.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] on a duplicate grant ID; [`StoreError::Unavailable`].
    async fn grant_insert_batch(
        &self,
        grants: &[GrantRecord],
        events: &[NewAuditEvent],
    ) -> Result<Vec<i64>>;

    /// One grant.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn grant_get(&self, id: &GrantId) -> Result<Option<GrantRecord>>;

    /// Grants matching `filter`, newest first, paged by an opaque cursor.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn grant_list(
        &self,
        filter: &GrantFilter,
        page: &PageRequest,
    ) -> Result<Page<GrantRecord>>;

    /// Extend an active grant: new expiry and revocation handle, renew count + 1.
    ///
    /// # Errors
    /// [`StoreError::NotFound`]; [`StoreError::Conflict`] if the grant is not active
    /// (or expired at `now`); [`StoreError::Unavailable`].
    async fn grant_renew(
        &self,
        id: &GrantId,
        now: UnixTime,
        new_expires_at: UnixTime,
        new_revocation_handle: &str,
        audit: NewAuditEvent,
    ) -> Result<GrantRecord>;

    /// Move an active grant to `to` (released or revoked).
    ///
    /// # Errors
    /// [`StoreError::NotFound`]; [`StoreError::Conflict`] if it is not active;
    /// [`StoreError::Unavailable`].
    async fn grant_finish(
        &self,
        id: &GrantId,
        to: GrantStatus,
        now: UnixTime,
        audit: NewAuditEvent,
    ) -> Result<GrantRecord>;

    /// Mark up to `limit` active grants whose expiry is `<= now` as expired, using the
    /// expiry index. Returns how many were marked; call again while it returns `limit`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    ///
    /// Grants of the destinations in `keep` are left alone: their expiry is handled by
    /// revocation jobs that remove the credential at the destination first.
    async fn grant_expire_due(&self, now: UnixTime, limit: u32, keep: &[String]) -> Result<u64>;

    /// Number of active (unexpired at `now`) grants, optionally for one workload.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn grant_count_active(&self, workload: Option<&str>, now: UnixTime) -> Result<u64>;

    // === replay cache ===

    /// Record a token ID. Returns `true` if it was not seen before (or its earlier
    /// record has expired at `now`), `false` if it is a replay.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn jti_record(
        &self,
        issuer: &str,
        jti: &str,
        expires_at: UnixTime,
        now: UnixTime,
    ) -> Result<bool>;

    /// Delete up to `limit` expired token IDs.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn jti_purge(&self, now: UnixTime, limit: u32) -> Result<u64>;

    // === audit ===

    /// Append audit events in one transaction, chained after the current head.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn audit_append(&self, events: &[NewAuditEvent]) -> Result<Vec<i64>>;

    /// Events with `seq > after`, ascending, at most `limit`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn audit_list(&self, after: i64, limit: u32) -> Result<Vec<AuditRecord>>;

    /// The chain head as the store records it beside the events: the last sequence
    /// number and its hash (`0` and [`GENESIS_HASH`] before the first event). Written in
    /// the same transaction as every append, so a tail cut off the events table alone
    /// shows up as a head beyond the last event.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn audit_head(&self) -> Result<(i64, String)>;

    // === workloads ===

    /// Record the claims workloads presented (insert, or update all but `first_seen`).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn workload_seen(&self, seen: &[WorkloadSeen]) -> Result<()>;

    /// What is recorded about one workload.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn workload_get(&self, workload_id: &str) -> Result<Option<WorkloadSeen>>;

    // === revocation ===

    /// Create a revocation job in one transaction: record the job, copy every grant the
    /// selector matches that is active and unexpired at `job.now` into the job's steps
    /// (state `pending`), mark those grants `revoked`, write `deny` if given (a
    /// [`ConfigKind::DenyEntry`], bumping the configuration generation), and append
    /// `audit` with `detail.matched` set to the number of grants matched.
    ///
    /// With [`NewRevocationJob::expired_only`], the active grants that have expired are
    /// matched instead and marked `expired`; when there are none, nothing is written and
    /// the result is [`StoreError::NotFound`].
    ///
    /// # Errors
    /// [`StoreError::Conflict`] if the job ID exists; [`StoreError::NotFound`] as above;
    /// [`StoreError::Unavailable`].
    async fn revocation_create(
        &self,
        job: &NewRevocationJob,
        deny: Option<NewConfigObject>,
        audit: NewAuditEvent,
    ) -> Result<RevocationJob>;

    /// One job.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn revocation_get(&self, id: &str) -> Result<Option<RevocationJob>>;

    /// Jobs, newest first, paged by an opaque cursor.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn revocation_list(&self, page: &PageRequest) -> Result<Page<RevocationJob>>;

    /// Step counts per destination of a job, ordered by destination.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn revocation_progress(&self, job_id: &str) -> Result<Vec<DestinationProgress>>;

    /// The destinations a job has steps at, ordered (cheap: one index probe each).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn revocation_destinations(&self, job_id: &str) -> Result<Vec<String>>;

    /// Take the lease of one running job that is due at `now_ms` and whose lease is
    /// free or lapsed; `owner` holds it until `lease_until_ms` unless it renews it.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn revocation_claim(
        &self,
        owner: &str,
        now_ms: i64,
        lease_until_ms: i64,
    ) -> Result<Option<RevocationJob>>;

    /// Up to `limit` steps of `job_id` at `destination` that are pending, or failed and
    /// due at `now_ms`, with grant ID after `after_grant`, in grant ID order.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn revocation_steps_due(
        &self,
        job_id: &str,
        destination: &str,
        now_ms: i64,
        after_grant: &str,
        limit: u32,
    ) -> Result<Vec<RevocationStep>>;

    /// Record receipts in one transaction, fenced by the lease: each receipt is stored,
    /// the steps of its grants move to its outcome (attempts + 1; a failed receipt's
    /// `retry_at_ms` becomes their due time), the job's receipt count and lease
    /// (`lease_until_ms`) move, and `events` are appended.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] if `owner` no longer holds the lease (another worker took
    /// the job over; nothing is written); [`StoreError::Unavailable`].
    async fn revocation_record(
        &self,
        owner: &str,
        job_id: &str,
        lease_until_ms: i64,
        receipts: &[RevocationReceiptRecord],
        events: &[NewAuditEvent],
    ) -> Result<Vec<i64>>;

    /// Push back the retry time of failed steps that were not attempted in this pass
    /// (their destination's circuit breaker was open), fenced by the lease, without a
    /// receipt: their last receipt still says why they failed.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] if `owner` no longer holds the lease;
    /// [`StoreError::Unavailable`].
    async fn revocation_defer(
        &self,
        owner: &str,
        job_id: &str,
        destination: &str,
        grant_ids: &[String],
        retry_at_ms: i64,
    ) -> Result<()>;

    /// An operator gives up on a running job's failed steps (of one destination, or all):
    /// they become `abandoned` and are not attempted again, and `audit` is appended with
    /// `detail.abandoned` set to how many. A job left with no pending or failed step and
    /// no sweep due is then `done` (unless a worker holds it; its release finishes it).
    ///
    /// # Errors
    /// [`StoreError::NotFound`] for an unknown job; [`StoreError::Conflict`] if it is
    /// done; [`StoreError::Unavailable`].
    async fn revocation_abandon(
        &self,
        job_id: &str,
        destination: Option<&str>,
        now_ms: i64,
        audit: NewAuditEvent,
    ) -> Result<u64>;

    /// Run a job's sweep, fenced by the lease: the active, unexpired grants its selector
    /// matches now (issued after the job was created, by servers that had not yet seen
    /// its deny entry) become steps of the job and are marked revoked, `matched` grows,
    /// and `sweep_at` is cleared. Returns how many were added.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] if `owner` no longer holds the lease;
    /// [`StoreError::Unavailable`].
    async fn revocation_sweep(&self, owner: &str, job_id: &str, now: UnixTime) -> Result<u64>;

    /// End a worker's pass over a job and give up its lease. When no step is pending or
    /// failed and no sweep is due later, the job becomes `done` at `now_ms` and
    /// `done_event` is appended; otherwise it stays running, due at its earliest failed
    /// step's retry time or its sweep, whichever is first.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] if `owner` no longer holds the lease;
    /// [`StoreError::Unavailable`].
    async fn revocation_release(
        &self,
        owner: &str,
        job_id: &str,
        now_ms: i64,
        done_event: NewAuditEvent,
    ) -> Result<RevocationJob>;

    /// Receipts of a job with `seq > after_seq`, ascending, at most `limit`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn revocation_receipts(
        &self,
        job_id: &str,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<RevocationReceiptRecord>>;

    /// Steps not yet at a final outcome (pending or failed), over all jobs: the
    /// revocation queue depth.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn revocation_queue_depth(&self) -> Result<u64>;

    /// Health check: a trivial query.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn ping(&self) -> Result<()>;
}
