-- Stripe top-ups (issue 13). Billing rows hold nothing but the account id, amounts,
-- Stripe ids and dates, so that anonymising an account (kept 7 years, policy clause 6)
-- is replacing one id; no card data is ever stored here. No foreign key to accounts,
-- for the same reason as credit_ledger.

-- The one Stripe Customer of an account, created on its first top-up.
CREATE TABLE billing_customers (
    account_id          uuid        PRIMARY KEY,
    stripe_customer_id  text        NOT NULL UNIQUE,
    created_at          timestamptz NOT NULL DEFAULT now()
);

-- One row per PaymentIntent we created: what it charges (credit + fee, in cents) and
-- what it credits. A client's request id maps to one PaymentIntent, so a repeated click
-- returns the PaymentIntent it already made.
CREATE TABLE billing_topups (
    payment_intent_id  text        PRIMARY KEY,
    account_id         uuid        NOT NULL,
    request_id         uuid        NOT NULL,
    credit_cents       bigint      NOT NULL CHECK (credit_cents > 0),
    fee_cents          bigint      NOT NULL CHECK (fee_cents >= 0),
    amount_cents       bigint      NOT NULL CHECK (amount_cents = credit_cents + fee_cents),
    currency           text        NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, request_id)
);

-- Every Stripe event that changed the ledger, written in the same transaction as its
-- ledger row: a re-delivered event finds its id here and changes nothing.
CREATE TABLE billing_events (
    event_id     text        PRIMARY KEY,
    type         text        NOT NULL,
    ledger_id    bigint      REFERENCES credit_ledger (id),
    received_at  timestamptz NOT NULL DEFAULT now()
);
