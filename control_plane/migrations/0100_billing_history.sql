-- Billing history (issue 13, h20): what became of each top-up, for the credits page and
-- its CSV. Still nothing but the account id, amounts, Stripe ids and dates, plus the
-- display data Stripe returns (card brand and last 4, the receipt link): anonymising
-- an account's billing rows stays replacing billing_topups.account_id. Whether a top-up
-- was credited is not stored here: its ledger row (reference 'stripe:<intent id>') says.

ALTER TABLE billing_topups
    -- Stripe's PaymentIntent as we last saw it: open (not paid yet), processing,
    -- succeeded, failed (an attempt was declined), canceled.
    ADD COLUMN status      text NOT NULL DEFAULT 'open'
        CHECK (status IN ('open', 'processing', 'succeeded', 'failed', 'canceled')),
    ADD COLUMN card_brand  text CHECK (length(card_brand) <= 20),
    ADD COLUMN card_last4  text CHECK (card_last4 ~ '^[0-9]{4}$'),
    ADD COLUMN receipt_url text CHECK (receipt_url LIKE 'https://%'),
    ADD COLUMN updated_at  timestamptz;

CREATE INDEX billing_topups_account_idx ON billing_topups (account_id, created_at);
