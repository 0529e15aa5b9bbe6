-- Revocation jobs, their per-grant steps (the outbox) and signed receipts.
-- Times here are milliseconds except grant expiry (seconds, as in `grants`).

CREATE TABLE revocation_jobs (
    id              TEXT COLLATE "C" NOT NULL PRIMARY KEY,  -- rvk_<uuidv7>: sorts by time
    selector_kind   TEXT    NOT NULL,
    selector_value  TEXT    NOT NULL,
    reason          TEXT    NOT NULL,
    requested_by    TEXT    NOT NULL,
    created_at      BIGINT NOT NULL,
    matched         BIGINT NOT NULL,
    state           TEXT    NOT NULL CHECK (state IN ('running', 'done')),
    finished_at     BIGINT,
    next_run_at     BIGINT NOT NULL,
    lease_owner     TEXT,
    lease_until     BIGINT NOT NULL DEFAULT 0,
    receipts        BIGINT NOT NULL DEFAULT 0,
    -- When set: the job matches its selector once more at this time (grants other
    -- replicas issued before they saw its deny entry), then clears it.
    sweep_at        BIGINT
);
-- Workers look for running jobs that are due.
CREATE INDEX revocation_jobs_due ON revocation_jobs (next_run_at) WHERE state = 'running';

CREATE TABLE revocation_steps (
    job_id             TEXT    NOT NULL,
    grant_id           TEXT COLLATE "C" NOT NULL,
    destination        TEXT    NOT NULL,
    workload_id        TEXT    NOT NULL,
    revocation_handle  TEXT    NOT NULL,
    expires_at         BIGINT NOT NULL,
    state              TEXT    NOT NULL
        CHECK (state IN ('pending', 'revoked', 'expires_at', 'failed', 'abandoned')),
    attempts           BIGINT NOT NULL DEFAULT 0,
    next_attempt_at    BIGINT NOT NULL DEFAULT 0,
    detail             TEXT    NOT NULL DEFAULT '',
    receipt_seq        BIGINT,
    PRIMARY KEY (job_id, destination, grant_id)
);
-- The primary key is how workers page through a job's steps per destination and how
-- receipts update them.

CREATE TABLE revocation_receipts (
    job_id       TEXT    NOT NULL,
    seq          BIGINT NOT NULL,
    destination  TEXT    NOT NULL,
    outcome      TEXT    NOT NULL CHECK (outcome IN ('revoked', 'expires_at', 'failed')),
    grant_ids    JSONB   NOT NULL,
    expires_at   BIGINT,
    detail       TEXT    NOT NULL,
    created_at   BIGINT NOT NULL,
    signature    TEXT    NOT NULL,
    retry_at     BIGINT,
    PRIMARY KEY (job_id, seq)
);

-- The claims each workload last presented (volatile claims such as exp and jti removed),
-- so inventory can evaluate policy for a workload without its token.
CREATE TABLE workloads (
    workload_id  TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    issuer       TEXT    NOT NULL,
    trust_rule   TEXT    NOT NULL,
    claims       JSONB   NOT NULL,
    first_seen   BIGINT  NOT NULL,
    last_seen    BIGINT  NOT NULL
);
