-- The prepaid credit ledger: every change to an account's balance is one row, in
-- integer micro-dollars (positive adds credit, negative spends it). The balance is the
-- sum of an account's rows; the live balance the proxy admits against lives in Redis
-- and is rebuilt from this table. Kept 7 years; anonymised, never deleted, when an
-- account is deleted, so account_id carries no foreign key that would block that.
CREATE TABLE credit_ledger (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id     uuid        NOT NULL,
    kind           text        NOT NULL
                               CHECK (kind IN ('topup', 'debit', 'refund', 'adjustment')),
    amount_micros  bigint      NOT NULL,
    -- A debit's request id: one debit per billed request however often its event is
    -- delivered.
    event_id       uuid        UNIQUE,
    -- An outside reference (payment id, admin note): one row per (kind, reference), so
    -- a retried top-up or webhook is not credited twice.
    reference      text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'debit') = (event_id IS NOT NULL)),
    CHECK (kind <> 'debit' OR amount_micros <= 0),
    CHECK (kind NOT IN ('topup', 'refund') OR amount_micros > 0)
);

CREATE UNIQUE INDEX credit_ledger_reference_idx
    ON credit_ledger (kind, reference) WHERE reference IS NOT NULL;
CREATE INDEX credit_ledger_account_idx ON credit_ledger (account_id, created_at);
