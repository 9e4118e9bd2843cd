-- Version 4: the journal. Indexes for the charge list's filters, each ending in its order
-- (created_at, charge_id) so that a page is an index range; and the refused reserves, which
-- a service's summary counts. (tokens_by_buyer, which the buyer filter uses, came with
-- version 3.)

CREATE INDEX charges_by_time ON charges (created_at, charge_id);
CREATE INDEX charges_by_token_time ON charges (token_id, created_at, charge_id);
CREATE INDEX charges_by_service_time ON charges (service_id, created_at, charge_id);

-- One row per fresh refused reserve: a refusal answered again from its Idempotency-Key is
-- not counted twice (no foreign key: refusals are statistics, never money). `sandbox`: the
-- book of the token refused, so that a summary of one book counts its own refusals.
CREATE TABLE refusals (
    service_id TEXT NOT NULL,
    token_id   TEXT NOT NULL,
    code       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    sandbox    INTEGER NOT NULL DEFAULT 0 CHECK (sandbox IN (0, 1))
) STRICT;

CREATE INDEX refusals_by_service_time ON refusals (service_id, created_at);
