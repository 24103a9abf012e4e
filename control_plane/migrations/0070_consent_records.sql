-- Consent (issue 15) and the account's privacy state (issue 14), the schema both build on.
--
-- consent_records is append-only: one row per choice (a purpose granted or withdrawn),
-- from the banner, settings, the GPC signal, an unsubscribe link or sign-up. The current
-- state of a purpose is its latest row; earlier rows stay untouched, so a withdrawal at
-- time T leaves what was recorded before T as it was (prior processing stands). Rows of
-- a browser before sign-in carry only browser_id (the id in the strictly necessary
-- consent cookie); at sign-in they are copied onto the account, never rewritten.
-- Personal data: part of the account's export, deleted with the account.
CREATE TABLE consent_records (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id      uuid        REFERENCES accounts (id) ON DELETE CASCADE,
    browser_id      uuid,
    purpose         text        NOT NULL
                                CHECK (purpose IN ('functional', 'analytics', 'marketing_email')),
    granted         boolean     NOT NULL,
    source          text        NOT NULL
                                CHECK (source IN ('banner', 'settings', 'gpc', 'unsubscribe',
                                                  'signup', 'policy_change')),
    policy_version  text        NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    CHECK (account_id IS NOT NULL OR browser_id IS NOT NULL)
);
CREATE INDEX consent_records_account_idx ON consent_records (account_id, purpose, id)
    WHERE account_id IS NOT NULL;
CREATE INDEX consent_records_browser_idx ON consent_records (browser_id, purpose, id)
    WHERE account_id IS NULL;

-- Append-only: a row is never changed. (Rows are deleted only with their account.)
CREATE FUNCTION consent_records_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'consent_records is append-only';
END $$;
CREATE TRIGGER consent_records_no_update BEFORE UPDATE ON consent_records
    FOR EACH ROW EXECUTE FUNCTION consent_records_append_only();

-- The account's privacy state. jurisdiction picks the legal clock of its privacy
-- requests (control_plane/privacy/deadlines.py); restricted_at marks a restriction of
-- processing (issue 14): the data is used only to serve the API and to bill.
ALTER TABLE accounts
    ADD COLUMN jurisdiction  text NOT NULL DEFAULT 'default'
                             CHECK (jurisdiction IN ('default', 'gdpr', 'ccpa', 'lgpd',
                                                     'kvkk', 'pipa')),
    ADD COLUMN restricted_at timestamptz;
