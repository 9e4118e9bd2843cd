-- paystile ledger schema for PostgreSQL, version 9: buyer keys. As the SQLite schema's
-- version 9.
CREATE TABLE buyer_keys (
    key_id           TEXT PRIMARY KEY,
    buyer_id         TEXT NOT NULL,
    key_hash         TEXT NOT NULL UNIQUE,
    label            TEXT,
    services         TEXT NOT NULL,
    max_limit_micros BIGINT CHECK (max_limit_micros > 0),
    created_at       BIGINT NOT NULL,
    last_used_at     BIGINT,
    revoked_at       BIGINT
);
CREATE INDEX buyer_keys_by_buyer ON buyer_keys (buyer_id, created_at);
