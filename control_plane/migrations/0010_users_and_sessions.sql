-- People who sign in, how they sign in, what they accepted, their sessions, staff
-- roles and the audit log (issue 11). Personal data in this file: users.email,
-- users.display_name, web_sessions.user_agent (a short summary, never the raw header);
-- each is part of the account's export and deletion purge.

CREATE TABLE users (
    id              uuid        PRIMARY KEY,
    email           text        NOT NULL,
    email_verified  boolean     NOT NULL,
    display_name    text,
    status          text        NOT NULL DEFAULT 'active'
                                CHECK (status IN ('active', 'suspended')),
    created_at      timestamptz NOT NULL DEFAULT now()
);
-- One person, one account: a second provider with the same email is linked from a
-- signed-in session, never by creating a second user.
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

-- One row per (provider, subject): the provider's own stable id of the person.
CREATE TABLE identities (
    provider    text        NOT NULL,
    subject     text        NOT NULL,
    user_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    email       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, subject)
);
CREATE INDEX identities_user_idx ON identities (user_id);

-- One user owns one account today; teams come later with more roles.
CREATE TABLE memberships (
    account_id  uuid        NOT NULL REFERENCES accounts (id),
    user_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role        text        NOT NULL CHECK (role IN ('owner')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, user_id)
);
CREATE INDEX memberships_user_idx ON memberships (user_id);

-- What a user accepted at sign-up (and again when a policy changes): a log of rows.
CREATE TABLE acceptances (
    id              bigserial   PRIMARY KEY,
    user_id         uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    what            text        NOT NULL CHECK (what IN ('age_18', 'terms', 'privacy_policy')),
    policy_version  text        NOT NULL,
    accepted_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX acceptances_user_idx ON acceptances (user_id, what);

-- A signed-in browser. The cookie carries only this id (signed); revocation is a
-- timestamp so "sign out everywhere" and suspension end sessions at once.
CREATE TABLE web_sessions (
    id            uuid        PRIMARY KEY,
    user_id       uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    account_id    uuid        NOT NULL REFERENCES accounts (id),
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    user_agent    text        NOT NULL DEFAULT '',
    revoked_at    timestamptz
);
CREATE INDEX web_sessions_user_idx ON web_sessions (user_id) WHERE revoked_at IS NULL;

CREATE TABLE staff_roles (
    user_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role        text        NOT NULL
                            CHECK (role IN ('viewer', 'support', 'billing', 'privacy', 'owner')),
    granted_by  text        NOT NULL,
    granted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, role)
);

-- Who did what to which target, when. Kept; exported by staff with the privacy role.
CREATE TABLE audit_log (
    id          bigserial   PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text        NOT NULL,
    action      text        NOT NULL,
    target      text        NOT NULL,
    account_id  uuid,
    detail      jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_account_idx ON audit_log (account_id, at);

-- Keys: management keys call the account API and never the LLM routes (they are
-- never published to the proxy); per-key credit limit with its reset period, expiry,
-- and a disabled flag distinct from revocation (a disabled key can be enabled again).
ALTER TABLE api_keys
    ADD COLUMN kind          text    NOT NULL DEFAULT 'inference'
                                     CHECK (kind IN ('inference', 'management')),
    ADD COLUMN credit_limit_micros bigint CHECK (credit_limit_micros >= 0),
    ADD COLUMN limit_reset   text    CHECK (limit_reset IN ('daily', 'weekly', 'monthly')),
    ADD COLUMN expires_at    timestamptz,
    ADD COLUMN disabled      boolean NOT NULL DEFAULT false;
