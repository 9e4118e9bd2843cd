-- paystile ledger schema for PostgreSQL, version 3: buyers' prepaid accounts and deposits,
-- chains of delegation (child tokens), sandbox tokens. As the SQLite schema's version 3.

-- A child token's parent: its spend counts against the parent and up the chain.
ALTER TABLE tokens ADD COLUMN parent_id TEXT REFERENCES tokens (token_id);
-- Sandbox tokens charge the sandbox book: never a buyer's balance or daily limit.
ALTER TABLE tokens ADD COLUMN sandbox BOOLEAN NOT NULL DEFAULT false;
CREATE INDEX tokens_by_parent ON tokens (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX tokens_by_buyer ON tokens (buyer_id);

-- Whether the hold is on its buyer's account, decided at reserve time: an account opened
-- while the call is in flight must not be debited for a hold it never held.
ALTER TABLE charges ADD COLUMN on_account BOOLEAN NOT NULL DEFAULT false;

CREATE TABLE buyers (
    buyer_id       TEXT PRIMARY KEY,
    -- Deposits minus committed charges.
    balance_micros BIGINT NOT NULL DEFAULT 0 CHECK (balance_micros >= 0),
    -- Open holds on the account.
    held_micros    BIGINT NOT NULL DEFAULT 0 CHECK (held_micros >= 0),
    tier           INTEGER NOT NULL CHECK (tier >= 1),
    -- The UTC day (days since the epoch) spent_micros counts.
    spent_day      BIGINT NOT NULL DEFAULT 0,
    spent_micros   BIGINT NOT NULL DEFAULT 0 CHECK (spent_micros >= 0),
    created_at     BIGINT NOT NULL,
    -- Holds fit the balance, enforced by the database too.
    CONSTRAINT buyers_holds_within_balance CHECK (held_micros <= balance_micros)
);

CREATE TABLE deposits (
    deposit_id    TEXT PRIMARY KEY,
    buyer_id      TEXT NOT NULL REFERENCES buyers (buyer_id),
    amount_micros BIGINT NOT NULL CHECK (amount_micros > 0),
    -- The caller's reference: one deposit per (buyer, reference).
    reference     TEXT,
    created_at    BIGINT NOT NULL,
    UNIQUE (buyer_id, reference)
);

-- Reserves release the buyer's expired holds first: find them through the buyer's tokens
-- among open holds only, never by scanning every charge of a token.
CREATE INDEX charges_open_by_token ON charges (token_id, hold_expires_at) WHERE status = 'held';
