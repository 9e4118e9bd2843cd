-- Version 9: buyer keys, with which a buyer manages its own tokens and reads its own
-- account and charges. Only each key's SHA-256 is kept: the key is shown once.
CREATE TABLE buyer_keys (
    key_id           TEXT PRIMARY KEY,
    buyer_id         TEXT NOT NULL,
    -- Hex SHA-256 of the whole key: what a presented key is looked up by.
    key_hash         TEXT NOT NULL UNIQUE,
    label            TEXT,
    -- JSON array of the service ids it may issue tokens for; empty: any.
    services         TEXT NOT NULL,
    -- The largest cap of a token it may issue; NULL: no limit of its own.
    max_limit_micros INTEGER CHECK (max_limit_micros > 0),
    created_at       INTEGER NOT NULL,
    last_used_at     INTEGER,
    revoked_at       INTEGER
) STRICT;
CREATE INDEX buyer_keys_by_buyer ON buyer_keys (buyer_id, created_at);
