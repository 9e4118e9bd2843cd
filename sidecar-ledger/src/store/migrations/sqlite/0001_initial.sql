-- paystile ledger schema, version 1. Amounts are integer micro-USDC; times are Unix ms.

CREATE TABLE tokens (
    token_id        TEXT PRIMARY KEY,
    buyer_id        TEXT NOT NULL,
    buyer_tag       TEXT,
    service_id      TEXT,
    scope           TEXT NOT NULL CHECK (scope IN ('SINGLE', 'ALL')),
    limit_micros    INTEGER NOT NULL CHECK (limit_micros >= 0),
    used_micros     INTEGER NOT NULL DEFAULT 0 CHECK (used_micros >= 0),
    reserved_micros INTEGER NOT NULL DEFAULT 0 CHECK (reserved_micros >= 0),
    expires_at      INTEGER NOT NULL,
    revoked_at      INTEGER,
    created_at      INTEGER NOT NULL,
    -- The cap, enforced by the database too: a rule bug fails the transaction, never overspends.
    CHECK (used_micros + reserved_micros <= limit_micros)
) STRICT;

CREATE TABLE charges (
    charge_id       TEXT PRIMARY KEY,
    token_id        TEXT NOT NULL REFERENCES tokens (token_id),
    service_id      TEXT NOT NULL,
    held_micros     INTEGER NOT NULL CHECK (held_micros > 0),
    status          TEXT NOT NULL CHECK (status IN ('held', 'committed', 'released')),
    idempotency_key TEXT,
    created_at      INTEGER NOT NULL,
    hold_expires_at INTEGER NOT NULL,
    settled_at      INTEGER,
    upstream_status INTEGER
) STRICT;

CREATE INDEX charges_open_holds ON charges (hold_expires_at) WHERE status = 'held';

-- The latest charge made under each (token, Idempotency-Key).
CREATE TABLE idempotency_keys (
    token_id    TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    charge_id   TEXT NOT NULL REFERENCES charges (charge_id),
    -- How often the charge was replayed (the upstream ran again, free): capped.
    replays     INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (token_id, key)
) STRICT, WITHOUT ROWID;
