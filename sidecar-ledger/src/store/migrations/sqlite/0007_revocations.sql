-- Version 7: the revocation feed gateway VMs watch, so that a revoked token's holds they
-- prefetched are dropped at once, and the VMs that watch it, so that a revoke can wait for
-- them.

-- The tokens whose open holds a revocation voided, in the order of the revocations.
CREATE TABLE revocations (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    token_id   TEXT NOT NULL,
    revoked_at INTEGER NOT NULL
) STRICT;

-- Each watching VM: the feed position it has applied, and when it last asked.
CREATE TABLE watchers (
    watcher_id TEXT PRIMARY KEY,
    seen_seq   INTEGER NOT NULL,
    seen_at    INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
