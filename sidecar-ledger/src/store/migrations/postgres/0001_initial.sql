-- paystile ledger schema for PostgreSQL, version 1: the tables and columns of the SQLite
-- schema. Amounts are integer micro-USDC (BIGINT); times are Unix milliseconds (BIGINT).

CREATE TABLE tokens (
    token_id        TEXT PRIMARY KEY,
    buyer_id        TEXT NOT NULL,
    buyer_tag       TEXT,
    service_id      TEXT,
    scope           TEXT NOT NULL CHECK (scope IN ('SINGLE', 'ALL')),
    limit_micros    BIGINT NOT NULL CHECK (limit_micros >= 0),
    used_micros     BIGINT NOT NULL DEFAULT 0 CHECK (used_micros >= 0),
    reserved_micros BIGINT NOT NULL DEFAULT 0 CHECK (reserved_micros >= 0),
    expires_at      BIGINT NOT NULL,
    revoked_at      BIGINT,
    created_at      BIGINT NOT NULL,
    -- The cap, enforced by the database too: a rule or locking bug fails the transaction,
    -- never overspends. (A sum past BIGINT is an error in PostgreSQL, not a wrap.)
    CONSTRAINT tokens_within_limit CHECK (used_micros + reserved_micros <= limit_micros)
);

CREATE TABLE charges (
    charge_id       TEXT PRIMARY KEY,
    token_id        TEXT NOT NULL REFERENCES tokens (token_id),
    service_id      TEXT NOT NULL,
    held_micros     BIGINT NOT NULL CHECK (held_micros > 0),
    status          TEXT NOT NULL CHECK (status IN ('held', 'committed', 'released')),
    idempotency_key TEXT,
    created_at      BIGINT NOT NULL,
    hold_expires_at BIGINT NOT NULL,
    settled_at      BIGINT,
    upstream_status INTEGER CHECK (upstream_status BETWEEN 0 AND 65535)
);

CREATE INDEX charges_open_holds ON charges (hold_expires_at) WHERE status = 'held';
CREATE INDEX charges_by_token ON charges (token_id);

-- The latest charge made under each (token, Idempotency-Key).
CREATE TABLE idempotency_keys (
    token_id    TEXT NOT NULL REFERENCES tokens (token_id),
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    charge_id   TEXT NOT NULL REFERENCES charges (charge_id),
    -- How often the charge was replayed (the upstream ran again, free): capped.
    replays     INTEGER NOT NULL DEFAULT 0 CHECK (replays >= 0),
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (token_id, key)
);
