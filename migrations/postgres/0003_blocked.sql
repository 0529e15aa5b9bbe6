-- Revocation outcome `blocked`: a deny rule written at the destination (an AWS role's
-- inline deny policy) that takes time to propagate, while the credential itself lives
-- until its expiry.

ALTER TABLE revocation_steps DROP CONSTRAINT revocation_steps_state_check;
ALTER TABLE revocation_steps ADD CONSTRAINT revocation_steps_state_check
    CHECK (state IN ('pending', 'revoked', 'blocked', 'expires_at', 'failed', 'abandoned'));

ALTER TABLE revocation_receipts DROP CONSTRAINT revocation_receipts_outcome_check;
ALTER TABLE revocation_receipts ADD CONSTRAINT revocation_receipts_outcome_check
    CHECK (outcome IN ('revoked', 'blocked', 'expires_at', 'failed'));
