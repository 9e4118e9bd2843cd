-- paystile ledger schema for PostgreSQL, version 2: partial commits, recorded refusals, key
-- retention. The same tables and columns as SQLite's version 2.

-- What a commit charged (at most what was held; the rest was released). NULL unless committed.
ALTER TABLE charges ADD COLUMN committed_micros BIGINT
    CHECK (committed_micros BETWEEN 0 AND held_micros);
UPDATE charges SET committed_micros = held_micros WHERE status = 'committed';

-- An Idempotency-Key keeps its request's outcome: its charge, or the refusal it got (the
-- JSON error body, answered again as it was).
ALTER TABLE idempotency_keys
    ALTER COLUMN charge_id DROP NOT NULL,
    ADD COLUMN refusal TEXT,
    ADD CONSTRAINT idempotency_keys_one_outcome CHECK ((charge_id IS NULL) <> (refusal IS NULL));
COMMENT ON COLUMN idempotency_keys.created_at IS
    'When the key''s current outcome was recorded: retention counts from here';
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
