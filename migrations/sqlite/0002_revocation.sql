-- Revocation jobs, their per-grant steps (the outbox) and signed receipts.
-- Times here are milliseconds except grant expiry (seconds, as in `grants`).

CREATE TABLE revocation_jobs (
    id              TEXT    NOT NULL PRIMARY KEY,  -- rvk_<uuidv7>: sorts by time
    selector_kind   TEXT    NOT NULL,
    selector_value  TEXT    NOT NULL,
    reason          TEXT    NOT NULL,
    requested_by    TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    matched         INTEGER NOT NULL,
    state           TEXT    NOT NULL CHECK (state IN ('running', 'done')),
    finished_at     INTEGER,
    next_run_at     INTEGER NOT NULL,
    lease_owner     TEXT,
    lease_until     INTEGER NOT NULL DEFAULT 0,
    receipts        INTEGER NOT NULL DEFAULT 0,
    -- When set: the job matches its selector once more at this time (grants other
    -- replicas issued before they saw its deny entry), then clears it.
    sweep_at        INTEGER
);
-- Workers look for running jobs that are due.
CREATE INDEX revocation_jobs_due ON revocation_jobs (next_run_at) WHERE state = 'running';

CREATE TABLE revocation_steps (
    job_id             TEXT    NOT NULL,
    grant_id           TEXT    NOT NULL,
    destination        TEXT    NOT NULL,
    workload_id        TEXT    NOT NULL,
    revocation_handle  TEXT    NOT NULL,
    expires_at         INTEGER NOT NULL,
    state              TEXT    NOT NULL
        CHECK (state IN ('pending', 'revoked', 'expires_at', 'failed', 'abandoned')),
    attempts           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at    INTEGER NOT NULL DEFAULT 0,
    detail             TEXT    NOT NULL DEFAULT '',
    receipt_seq        INTEGER,
    PRIMARY KEY (job_id, destination, grant_id)
) WITHOUT ROWID;
-- One b-tree: a job's steps per destination in grant order, which is how workers page
-- through them and how receipts update them.

CREATE TABLE revocation_receipts (
    job_id       TEXT    NOT NULL,
    seq          INTEGER NOT NULL,
    destination  TEXT    NOT NULL,
    outcome      TEXT    NOT NULL CHECK (outcome IN ('revoked', 'expires_at', 'failed')),
    grant_ids    TEXT    NOT NULL,  -- JSON array
    expires_at   INTEGER,
    detail       TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    signature    TEXT    NOT NULL,
    retry_at     INTEGER,
    PRIMARY KEY (job_id, seq)
);

-- The claims each workload last presented (volatile claims such as exp and jti removed),
-- so inventory can evaluate policy for a workload without its token.
CREATE TABLE workloads (
    workload_id  TEXT    NOT NULL PRIMARY KEY,
    issuer       TEXT    NOT NULL,
    trust_rule   TEXT    NOT NULL,
    claims       TEXT    NOT NULL,  -- JSON object
    first_seen   INTEGER NOT NULL,
    last_seen    INTEGER NOT NULL
);
