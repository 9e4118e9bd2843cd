-- paystile ledger schema, version 5: charges.status checked by comparisons.

-- SQLite evaluates `status IN ('held', 'committed', 'released')` (three constants or more)
-- by building a temporary table on every insert and every change of status: that cost more
-- than the rest of the write. The same check spelled as comparisons costs nothing. SQLite
-- cannot change a CHECK in place, so the table is rebuilt as it is otherwise, with its
-- indexes (migrations run with foreign keys off: idempotency_keys references charges).
CREATE TABLE charges_v5 (
    charge_id        TEXT PRIMARY KEY,
    token_id         TEXT NOT NULL REFERENCES tokens (token_id),
    service_id       TEXT NOT NULL,
    held_micros      INTEGER NOT NULL CHECK (held_micros > 0),
    status           TEXT NOT NULL
        CHECK (status = 'held' OR status = 'committed' OR status = 'released'),
    idempotency_key  TEXT,
    created_at       INTEGER NOT NULL,
    hold_expires_at  INTEGER NOT NULL,
    settled_at       INTEGER,
    upstream_status  INTEGER,
    committed_micros INTEGER CHECK (committed_micros BETWEEN 0 AND held_micros),
    on_account       INTEGER NOT NULL DEFAULT 0 CHECK (on_account IN (0, 1))
) STRICT;
INSERT INTO charges_v5 (rowid, charge_id, token_id, service_id, held_micros, status,
                        idempotency_key, created_at, hold_expires_at, settled_at,
                        upstream_status, committed_micros, on_account)
    SELECT rowid, charge_id, token_id, service_id, held_micros, status, idempotency_key,
           created_at, hold_expires_at, settled_at, upstream_status, committed_micros,
           on_account
    FROM charges;
DROP TABLE charges;
ALTER TABLE charges_v5 RENAME TO charges;

CREATE INDEX charges_open_holds ON charges (hold_expires_at) WHERE status = 'held';
CREATE INDEX charges_open_by_token ON charges (token_id, hold_expires_at) WHERE status = 'held';
CREATE INDEX charges_by_time ON charges (created_at, charge_id);
CREATE INDEX charges_by_token_time ON charges (token_id, created_at, charge_id);
CREATE INDEX charges_by_service_time ON charges (service_id, created_at, charge_id);
