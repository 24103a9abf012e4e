-- Admission settings and the hand-off of credits to Redis.
--
-- Limits are a JSON object per account and per key: "rpm" (requests per minute),
-- "tpm" (tokens per minute), "conc" (concurrent requests), each a non-negative
-- integer; a name left out (or 0) means unlimited. The control plane validates them
-- before writing; the CHECKs keep anything else out however a row is written.
CREATE FUNCTION qnp_valid_limits(l jsonb) RETURNS boolean
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE WHEN jsonb_typeof(l) <> 'object' THEN false ELSE
        (l - ARRAY['rpm', 'tpm', 'conc']) = '{}'::jsonb
        AND NOT EXISTS (
            SELECT 1 FROM jsonb_each(l) AS e (name, value)
            WHERE jsonb_typeof(e.value) <> 'number'
               OR e.value::text !~ '^[0-9]{1,15}$'
        )
    END
$$;

ALTER TABLE accounts
    ADD COLUMN limits jsonb NOT NULL DEFAULT '{}' CHECK (qnp_valid_limits(limits));
ALTER TABLE api_keys
    ADD COLUMN limits jsonb NOT NULL DEFAULT '{}' CHECK (qnp_valid_limits(limits));

-- Credits (top-ups, refunds, adjustments) committed to the ledger but not yet added to
-- the live balance in Redis. A credit inserts its row here in the same transaction as
-- its ledger row and deletes it once Redis has it; a row left behind (the process died,
-- or Redis was unreachable, between the commit and the Redis write) is applied by the
-- reconciler. Redis remembers the highest ledger id it applied, so applying twice is
-- harmless.
CREATE TABLE credit_pending (
    ledger_id   bigint PRIMARY KEY REFERENCES credit_ledger (id),
    account_id  uuid   NOT NULL
);

CREATE INDEX credit_pending_account_idx ON credit_pending (account_id, ledger_id);
