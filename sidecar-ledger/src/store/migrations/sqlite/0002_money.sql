-- paystile ledger schema, version 2: partial commits, recorded refusals, key retention.

-- What a commit charged (at most what was held; the rest was released). NULL unless committed.
ALTER TABLE charges ADD COLUMN committed_micros INTEGER
    CHECK (committed_micros BETWEEN 0 AND held_micros);
UPDATE charges SET committed_micros = held_micros WHERE status = 'committed';

-- An Idempotency-Key keeps its request's outcome: its charge, or the refusal it got (the
-- JSON error body, answered again as it was). SQLite cannot drop NOT NULL in place.
CREATE TABLE idempotency_keys_v2 (
    token_id    TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    charge_id   TEXT REFERENCES charges (charge_id),
    refusal     TEXT,
    -- How often the charge was replayed (the upstream ran again, free): capped.
    replays     INTEGER NOT NULL DEFAULT 0,
    -- When the key's current outcome was recorded: retention counts from here.
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (token_id, key),
    CHECK ((charge_id IS NULL) <> (refusal IS NULL))
) STRICT, WITHOUT ROWID;
INSERT INTO idempotency_keys_v2 (token_id, key, fingerprint, charge_id, replays, created_at)
    SELECT token_id, key, fingerprint, charge_id, replays, created_at FROM idempotency_keys;
DROP TABLE idempotency_keys;
ALTER TABLE idempotency_keys_v2 RENAME TO idempotency_keys;
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
