-- Reversals of Stripe payments (issue 13): refunds, disputes, and the reconciliation
-- job's cursor. Like the other billing rows these hold nothing but the account id,
-- amounts, Stripe ids, Stripe's reason codes and dates (kept 7 years, anonymised by
-- replacing the account id); no foreign key to accounts, for the same reason.

-- A reversal moves credit because Stripe moved money back: negative for a refund or a
-- dispute's withdrawal, positive when a won dispute reinstates it. Written only by
-- control_plane/billing/reversals.py, never through the admin credit API.
ALTER TABLE credit_ledger DROP CONSTRAINT credit_ledger_kind_check;
ALTER TABLE credit_ledger ADD CONSTRAINT credit_ledger_kind_check
    CHECK (kind IN ('topup', 'debit', 'refund', 'adjustment', 'reversal'));
ALTER TABLE credit_ledger ADD CONSTRAINT credit_ledger_reversal_nonzero
    CHECK (kind <> 'reversal' OR amount_micros <> 0);

-- One row per charge of one of our top-ups that Stripe reversed in part or whole.
-- refunded_cents is the highest cumulative amount_refunded seen (by webhook or by
-- reconciliation); reversed_micros is what the ledger's reversal rows for this charge
-- add up to, negated. Changed only under the account's ledger lock, in the same
-- transaction as the ledger row and the Stripe event id.
CREATE TABLE billing_charges (
    charge_id          text        PRIMARY KEY,
    payment_intent_id  text        NOT NULL REFERENCES billing_topups (payment_intent_id),
    account_id         uuid        NOT NULL,
    refunded_cents     bigint      NOT NULL DEFAULT 0 CHECK (refunded_cents >= 0),
    reversed_micros    bigint      NOT NULL DEFAULT 0 CHECK (reversed_micros >= 0),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_charges_intent_idx ON billing_charges (payment_intent_id);

-- The refunds we know by id (from the event's list or Stripe's refund list): the sum
-- of a charge's refunds is a floor for its refunded_cents.
CREATE TABLE billing_refunds (
    refund_id     text        PRIMARY KEY,
    charge_id     text        NOT NULL REFERENCES billing_charges (charge_id),
    amount_cents  bigint      NOT NULL CHECK (amount_cents > 0),
    seen_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_refunds_charge_idx ON billing_refunds (charge_id);

-- Disputes (chargebacks) of our charges. Facts only ever accumulate, so events in any
-- order end in the same row: withdrawn turns true once Stripe took the funds; outcome
-- is set once ('won', 'lost', or 'closed' for an inquiry closed without a chargeback).
-- The account's keys are paused while a dispute is withdrawn and has no outcome.
-- reason is Stripe's reason code (fraudulent, product_not_received, ...), never text
-- the cardholder wrote.
CREATE TABLE billing_disputes (
    dispute_id    text        PRIMARY KEY,
    charge_id     text        NOT NULL REFERENCES billing_charges (charge_id),
    account_id    uuid        NOT NULL,
    amount_cents  bigint      NOT NULL CHECK (amount_cents >= 0),
    reason        text        NOT NULL,
    status        text        NOT NULL,
    withdrawn     boolean     NOT NULL DEFAULT false,
    outcome       text        CHECK (outcome IN ('won', 'lost', 'closed')),
    opened_at     timestamptz NOT NULL DEFAULT now(),
    closed_at     timestamptz,
    CHECK ((outcome IS NULL) = (closed_at IS NULL))
);
CREATE INDEX billing_disputes_open_idx ON billing_disputes (account_id)
    WHERE withdrawn AND outcome IS NULL;

-- The reconciliation job's cursor: objects created at or after since_unix are listed
-- on the next run (less a look-back window).
CREATE TABLE billing_reconcile_cursor (
    name         text        PRIMARY KEY,
    since_unix   bigint      NOT NULL,
    last_run_at  timestamptz NOT NULL DEFAULT now()
);
