-- Version 8: x402 payments, each the one-call token `token_id` (x402_<payment id>), and their
-- settlement on chain: a durable job, run once the call's charge is committed.

CREATE TABLE x402_payments (
    token_id        TEXT PRIMARY KEY,
    -- What it pays for: one call (`call`), or a prepaid balance and a Pay Token (`top-up`).
    -- A payment is taken for one of them, once.
    kind            TEXT NOT NULL CHECK (kind = 'call' OR kind = 'top-up'),
    payer           TEXT NOT NULL,
    network         TEXT NOT NULL,
    amount_micros   INTEGER NOT NULL CHECK (amount_micros > 0),
    -- The authorization's validBefore (Unix seconds): it cannot settle after it.
    valid_before    INTEGER NOT NULL,
    -- The payment as the gateway presented it (`x402v2 <PAYMENT-SIGNATURE>`): what is settled.
    payment         TEXT NOT NULL,
    -- pending: not sent yet; submitted: a transaction was signed (tx_hash, raw_tx) and sent;
    -- settled, failed (reason): final; void: no call was charged for it and none can be.
    status          TEXT NOT NULL
        CHECK (status = 'pending' OR status = 'submitted' OR status = 'settled'
               OR status = 'failed' OR status = 'void'),
    tx_hash         TEXT,
    raw_tx          TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    reason          TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
) STRICT;

CREATE INDEX x402_payments_due ON x402_payments (next_attempt_at)
    WHERE status = 'pending' OR status = 'submitted';
