-- Version 2: the journal. Indexes for the charge list's filters, each ending in its order
-- (created_at, charge_id) so that a page is an index range; and the refused reserves, which
-- a service's summary counts.

CREATE INDEX charges_by_time ON charges (created_at, charge_id);
CREATE INDEX charges_by_token_time ON charges (token_id, created_at, charge_id);
CREATE INDEX charges_by_service_time ON charges (service_id, created_at, charge_id);
CREATE INDEX tokens_by_buyer ON tokens (buyer_id);

-- One row per refused reserve (no foreign key: refusals are statistics, never money).
CREATE TABLE refusals (
    service_id TEXT NOT NULL,
    token_id   TEXT NOT NULL,
    code       TEXT NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

CREATE INDEX refusals_by_service_time ON refusals (service_id, created_at);
