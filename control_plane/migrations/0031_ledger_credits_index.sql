-- The dashboard's Credits page lists an account's top-ups, refunds and adjustments,
-- newest first. They are a handful among a busy account's million debits a month: this
-- index finds them without walking the debits.
CREATE INDEX credit_ledger_credits_idx ON credit_ledger (account_id, created_at)
    WHERE kind <> 'debit';
