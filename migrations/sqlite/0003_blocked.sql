-- Revocation outcome `blocked`: a deny rule written at the destination (an AWS role's
-- inline deny policy) that takes time to propagate, while the credential itself lives
-- until its expiry. SQLite cannot alter a CHECK constraint, so both tables are rebuilt
-- (same columns, same keys).

CREATE TABLE revocation_steps_v3 (
    job_id             TEXT    NOT NULL,
    grant_id           TEXT    NOT NULL,
    destination        TEXT    NOT NULL,
    workload_id        TEXT    NOT NULL,
    revocation_handle  TEXT    NOT NULL,
    expires_at         INTEGER NOT NULL,
    state              TEXT    NOT NULL
        CHECK (state IN ('pending', 'revoked', 'blocked', 'expires_at', 'failed', 'abandoned')),
    attempts           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at    INTEGER NOT NULL DEFAULT 0,
    detail             TEXT    NOT NULL DEFAULT '',
    receipt_seq        INTEGER,
    PRIMARY KEY (job_id, destination, grant_id)
) WITHOUT ROWID;
INSERT INTO revocation_steps_v3 SELECT * FROM revocation_steps;
DROP TABLE revocation_steps;
ALTER TABLE revocation_steps_v3 RENAME TO revocation_steps;

CREATE TABLE revocation_receipts_v3 (
    job_id       TEXT    NOT NULL,
    seq          INTEGER NOT NULL,
    destination  TEXT    NOT NULL,
    outcome      TEXT    NOT NULL CHECK (outcome IN ('revoked', 'blocked', 'expires_at', 'failed')),
    grant_ids    TEXT    NOT NULL,  -- JSON array
    expires_at   INTEGER,
    detail       TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    signature    TEXT    NOT NULL,
    retry_at     INTEGER,
    PRIMARY KEY (job_id, seq)
);
INSERT INTO revocation_receipts_v3 SELECT * FROM revocation_receipts;
DROP TABLE revocation_receipts;
ALTER TABLE revocation_receipts_v3 RENAME TO revocation_receipts;
