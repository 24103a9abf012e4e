-- Auto top-up and the low-balance e-mail (issue 13).
--
-- balance_triggers: one row per (account, kind) the user set up, with the armed state
-- that makes "once per crossing" hold across replicas. A trigger fires when the
-- balance is below its threshold and it is armed; firing disarms it and counts the
-- crossing in the same conditional UPDATE (one replica wins, the others update
-- nothing), and it is re-armed once the balance is back at or above the threshold.
-- Rows are never deleted while the account exists, only disabled: the crossing number
-- names the off-session charge's idempotency key, so it must never count from 1 again.
CREATE TABLE balance_triggers (
    account_id        uuid        NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    kind              text        NOT NULL CHECK (kind IN ('auto_topup', 'low_balance')),
    enabled           boolean     NOT NULL DEFAULT true,
    threshold_micros  bigint      NOT NULL CHECK (threshold_micros > 0),
    armed             boolean     NOT NULL DEFAULT true,
    crossings         bigint      NOT NULL DEFAULT 0,
    fired_at          timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, kind)
);
-- The re-arm sweep reads only disarmed triggers.
CREATE INDEX balance_triggers_disarmed ON balance_triggers (account_id)
    WHERE enabled AND NOT armed;

-- What an auto top-up charges: the credit chosen and the card saved for off-session
-- use (a Stripe PaymentMethod id, plus the brand and last 4 Stripe returns, for
-- display: no other card data). disabled_reason is Stripe's code when a failed charge
-- turned auto top-up off. Account settings, deleted with the account.
CREATE TABLE auto_topup_settings (
    account_id         uuid        PRIMARY KEY REFERENCES accounts (id) ON DELETE CASCADE,
    amount_cents       bigint      CHECK (amount_cents > 0),
    payment_method_id  text,
    card_brand         text,
    card_last4         text,
    disabled_reason    text,
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- One off-session charge per crossing, written in the transaction that claimed the
-- crossing; the charger takes due rows with FOR UPDATE SKIP LOCKED. Its idempotency key
-- is qnp-auto-topup-<account>-<crossing>, so a retry after a crash finds the same
-- PaymentIntent at Stripe. A billing row (kept 7 years): account id, amounts, Stripe ids,
-- Stripe's reason code and dates only, no foreign key to accounts (as credit_ledger).
CREATE TABLE auto_topup_charges (
    account_id         uuid        NOT NULL,
    crossing           bigint      NOT NULL,
    credit_cents       bigint      NOT NULL CHECK (credit_cents > 0),
    fee_cents          bigint      NOT NULL CHECK (fee_cents >= 0),
    payment_method_id  text        NOT NULL,
    status             text        NOT NULL DEFAULT 'pending'
                                   CHECK (status IN ('pending', 'succeeded', 'processing',
                                                     'failed')),
    payment_intent_id  text,
    failure_code       text,
    attempts           integer     NOT NULL DEFAULT 0,
    next_attempt_at    timestamptz NOT NULL DEFAULT now(),
    created_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz,
    PRIMARY KEY (account_id, crossing)
);
CREATE INDEX auto_topup_charges_due ON auto_topup_charges (next_attempt_at)
    WHERE status = 'pending';
