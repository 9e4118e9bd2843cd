-- Version 6: an Idempotency-Key keeps a refusal as its code and the amounts its answer
-- needs, not as the JSON body it was answered with: the API words refusals, the books keep
-- what was decided. SQLite cannot change a CHECK in place, so the table is rebuilt.
CREATE TABLE idempotency_keys_v6 (
    token_id                 TEXT NOT NULL,
    key                      TEXT NOT NULL,
    fingerprint              TEXT NOT NULL,
    charge_id                TEXT REFERENCES charges (charge_id),
    -- The refusal's code, as the API writes it, and its amounts (micro-USDC) where its
    -- answer names them: the price refused; the limit it went past (the token's, or the
    -- day's); what was used (by the token, or today); the token's holds; the balance
    -- available; the buyer's tier.
    refusal_code             TEXT,
    refusal_price_micros     INTEGER,
    refusal_limit_micros     INTEGER,
    refusal_used_micros      INTEGER,
    refusal_reserved_micros  INTEGER,
    refusal_available_micros INTEGER,
    refusal_tier             INTEGER,
    -- How often the charge was replayed (the upstream ran again, free): capped.
    replays                  INTEGER NOT NULL DEFAULT 0,
    -- When the key's current outcome was recorded: retention counts from here.
    created_at               INTEGER NOT NULL,
    PRIMARY KEY (token_id, key),
    CHECK ((charge_id IS NULL) <> (refusal_code IS NULL))
) STRICT, WITHOUT ROWID;

-- Amounts were written with 6 decimals ("0.001000"): without the point, micro-USDC. The
-- balance, the daily limit, the tier and today's use are read back from the message, the
-- only place the body named them. A refusal of any other code was never recorded; one
-- found all the same is forgotten (its key's retry runs anew).
INSERT INTO idempotency_keys_v6 (token_id, key, fingerprint, charge_id, refusal_code,
                                 refusal_price_micros, refusal_limit_micros,
                                 refusal_used_micros, refusal_reserved_micros,
                                 refusal_available_micros, refusal_tier, replays, created_at)
    SELECT token_id, key, fingerprint, charge_id, code,
           CAST(replace(json_extract(refusal, '$.price'), '.', '') AS INTEGER),
           CASE code
               WHEN 'token_limit_exceeded'
                   THEN CAST(replace(json_extract(refusal, '$.limit'), '.', '') AS INTEGER)
               WHEN 'daily_limit_exceeded'
                   THEN CAST(replace(substr(error, 23, instr(error, ' USDC a day') - 23), '.', '')
                             AS INTEGER)
           END,
           CASE code
               WHEN 'token_limit_exceeded'
                   THEN CAST(replace(json_extract(refusal, '$.used'), '.', '') AS INTEGER)
               WHEN 'daily_limit_exceeded'
                   THEN CAST(replace(substr(error, instr(error, '), ') + 3,
                                            instr(error, ' USDC spent') - instr(error, '), ') - 3),
                                     '.', '') AS INTEGER)
           END,
           CASE code
               WHEN 'token_limit_exceeded'
                   THEN CAST(replace(json_extract(refusal, '$.reserved'), '.', '') AS INTEGER)
           END,
           CASE code
               WHEN 'insufficient_balance'
                   THEN CAST(replace(substr(error, 23, instr(error, ' USDC available') - 23), '.', '')
                             AS INTEGER)
           END,
           CASE code
               WHEN 'daily_limit_exceeded'
                   THEN CAST(substr(error, instr(error, '(tier ') + 6,
                                    instr(error, '), ') - instr(error, '(tier ') - 6) AS INTEGER)
           END,
           replays, created_at
    FROM (SELECT *, json_extract(refusal, '$.code') AS code,
                 json_extract(refusal, '$.error') AS error
          FROM idempotency_keys)
    WHERE charge_id IS NOT NULL
       OR code IN ('token_revoked', 'wrong_service', 'token_limit_exceeded',
                   'insufficient_balance', 'daily_limit_exceeded', 'internal');
DROP TABLE idempotency_keys;
ALTER TABLE idempotency_keys_v6 RENAME TO idempotency_keys;
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
