-- The e-mail outbox (issue 15, "E-mail"): one row per message to send, written in the
-- same transaction as whatever caused it (a sign-in notice, a receipt, a policy change),
-- so a message is queued if and only if that change committed. The sender
-- (control_plane/mail/sender.py) claims due rows with FOR UPDATE SKIP LOCKED and marks
-- them sent in the claiming transaction. Rows hold an address and a body: personal
-- data, deleted with the account; last_error holds a code only, never a server reply
-- (replies echo addresses).
CREATE TABLE email_outbox (
    id               bigserial   PRIMARY KEY,
    account_id       uuid        REFERENCES accounts (id) ON DELETE CASCADE,
    to_address       text        NOT NULL,
    kind             text        NOT NULL CHECK (kind IN ('transactional', 'marketing')),
    template         text        NOT NULL,              -- e.g. 'signin_notice'
    subject          text        NOT NULL,
    body             text        NOT NULL,              -- text/plain
    headers          jsonb       NOT NULL DEFAULT '{}', -- extra, e.g. List-Unsubscribe
    created_at       timestamptz NOT NULL DEFAULT now(),
    attempts         integer     NOT NULL DEFAULT 0,
    -- NULL once sent or given up: what is not due is never scanned again.
    next_attempt_at  timestamptz          DEFAULT now(),
    sent_at          timestamptz,
    last_error       text
);

-- The sender's claim: due rows, oldest due first.
CREATE INDEX email_outbox_due ON email_outbox (next_attempt_at)
    WHERE next_attempt_at IS NOT NULL;
CREATE INDEX email_outbox_account ON email_outbox (account_id);
