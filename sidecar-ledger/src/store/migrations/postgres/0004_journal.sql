-- Version 4: the journal (as the SQLite schema's version 4). Indexes for the charge list's
-- filters, each ending in its order (created_at, charge_id in byte order, so that both
-- stores page alike whatever the database's collation); and the refused reserves, which a
-- service's summary counts. (tokens_by_buyer, which the buyer filter uses, came with
-- version 3.)

CREATE INDEX charges_by_time ON charges (created_at, charge_id COLLATE "C");
CREATE INDEX charges_by_token_time ON charges (token_id, created_at, charge_id COLLATE "C");
CREATE INDEX charges_by_service_time ON charges (service_id, created_at, charge_id COLLATE "C");
-- charges_by_token_time leads with token_id: it serves the foreign key's lookups, and
-- versions 2 and 3's per-token queries, as charges_by_token did.
DROP INDEX charges_by_token;

-- One row per fresh refused reserve: a refusal answered again from its Idempotency-Key is
-- not counted twice (no foreign key: refusals are statistics, never money). `sandbox`: the
-- book of the token refused, so that a summary of one book counts its own refusals.
CREATE TABLE refusals (
    service_id TEXT NOT NULL,
    token_id   TEXT NOT NULL,
    code       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    sandbox    BOOLEAN NOT NULL DEFAULT false
);

CREATE INDEX refusals_by_service_time ON refusals (service_id, created_at);
