-- Version 7 (as the SQLite schema's version 7): the revocation feed gateway VMs watch, so
-- that a revoked token's holds they prefetched are dropped at once, and the VMs that watch
-- it, so that a revoke can wait for them.

-- The tokens whose open holds a revocation voided, in the order of the revocations: a
-- revocation takes an exclusive lock on the table before it inserts, so that sequence order
-- is commit order and a watcher reading past its position never skips a later commit.
CREATE TABLE revocations (
    seq        BIGSERIAL PRIMARY KEY,
    token_id   TEXT NOT NULL,
    revoked_at BIGINT NOT NULL
);

-- Each watching VM: the feed position it has applied, and when it last asked.
CREATE TABLE watchers (
    watcher_id TEXT PRIMARY KEY,
    seen_seq   BIGINT NOT NULL,
    seen_at    BIGINT NOT NULL
);
