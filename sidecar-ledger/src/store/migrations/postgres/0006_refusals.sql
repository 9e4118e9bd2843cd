-- Version 6 (as the SQLite schema's version 6): an Idempotency-Key keeps a refusal as its
-- code and the amounts its answer needs, not as the JSON body it was answered with: the API
-- words refusals, the books keep what was decided.

-- The refusal's code, as the API writes it, and its amounts (micro-USDC) where its answer
-- names them: the price refused; the limit it went past (the token's, or the day's); what
-- was used (by the token, or today); the token's holds; the balance available; the tier.
ALTER TABLE idempotency_keys
    ADD COLUMN refusal_code TEXT,
    ADD COLUMN refusal_price_micros BIGINT,
    ADD COLUMN refusal_limit_micros BIGINT,
    ADD COLUMN refusal_used_micros BIGINT,
    ADD COLUMN refusal_reserved_micros BIGINT,
    ADD COLUMN refusal_available_micros BIGINT,
    ADD COLUMN refusal_tier INTEGER;

-- Amounts were written with 6 decimals ("0.001000"): without the point, micro-USDC. The
-- balance, the daily limit, the tier and today's use are read back from the message, the
-- only place the body named them.
UPDATE idempotency_keys k SET
    refusal_code = r.body ->> 'code',
    refusal_price_micros = replace(r.body ->> 'price', '.', '')::bigint,
    refusal_limit_micros = replace(coalesce(
        r.body ->> 'limit',
        substring(r.body ->> 'error' from '^Daily limit exceeded: ([0-9.]+) USDC')), '.', '')::bigint,
    refusal_used_micros = replace(coalesce(
        r.body ->> 'used',
        substring(r.body ->> 'error' from '\), ([0-9.]+) USDC spent')), '.', '')::bigint,
    refusal_reserved_micros = replace(r.body ->> 'reserved', '.', '')::bigint,
    refusal_available_micros = replace(
        substring(r.body ->> 'error' from '^Insufficient balance: ([0-9.]+) USDC'), '.', '')::bigint,
    refusal_tier = substring(r.body ->> 'error' from '\(tier ([0-9]+)\)')::integer
FROM (SELECT token_id, key, refusal::jsonb AS body FROM idempotency_keys
      WHERE refusal IS NOT NULL) r
WHERE k.token_id = r.token_id AND k.key = r.key;

-- A refusal of any other code was never recorded; one found all the same is forgotten (its
-- key's retry runs anew).
DELETE FROM idempotency_keys
WHERE refusal IS NOT NULL
  AND (refusal_code IS NULL
       OR refusal_code NOT IN ('token_revoked', 'wrong_service', 'token_limit_exceeded',
                               'insufficient_balance', 'daily_limit_exceeded', 'internal'));

ALTER TABLE idempotency_keys
    DROP CONSTRAINT idempotency_keys_one_outcome,
    DROP COLUMN refusal,
    ADD CONSTRAINT idempotency_keys_one_outcome
        CHECK ((charge_id IS NULL) <> (refusal_code IS NULL));
