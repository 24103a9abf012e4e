-- Privacy rights (issue 14): what exercising them needs beyond privacy_requests.
-- Personal data in this file: privacy_request_details.text (a person's own words),
-- email_changes.new_email. Both are part of the account's export and are deleted with
-- the account (ON DELETE CASCADE from accounts); privacy_objections is the account's
-- choice, exported and deleted with it too.

-- What a staff request is about, kept apart from privacy_requests (which hold no
-- personal data and outlive the account as the record of compliance): the subject is a
-- short code (an objection's purpose, a human review's 'dispute:dp_123'), the text the
-- person's free-text correction or grounds. Deleted with the account.
CREATE TABLE privacy_request_details (
    request_id  bigint      PRIMARY KEY REFERENCES privacy_requests (id) ON DELETE CASCADE,
    account_id  uuid        NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    subject     text        NOT NULL DEFAULT '' CHECK (length(subject) <= 64),
    text        text        NOT NULL DEFAULT '' CHECK (length(text) <= 4000)
);
CREATE INDEX privacy_request_details_account_idx ON privacy_request_details (account_id);

-- Objections to processing on legitimate interest that take effect at once (GDPR art.
-- 21(1), KVKK art. 11(1)(g), LGPD art. 18 par. 2): one row per purpose objected to;
-- withdrawing the objection deletes the row. Consumers ask rights.processing_allowed.
CREATE TABLE privacy_objections (
    account_id   uuid        NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    purpose      text        NOT NULL CHECK (purpose IN ('service_improvement', 'analytics')),
    objected_at  timestamptz NOT NULL,
    PRIMARY KEY (account_id, purpose)
);

-- A change of e-mail address waiting for its confirmation link to be opened by the
-- signed-in user. The link carries a signed token naming this row; the row makes it
-- single use (used_at) and bounds it (expires_at).
CREATE TABLE email_changes (
    id          uuid        PRIMARY KEY,
    user_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    account_id  uuid        NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    new_email   text        NOT NULL,
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);
CREATE INDEX email_changes_user_idx ON email_changes (user_id);
