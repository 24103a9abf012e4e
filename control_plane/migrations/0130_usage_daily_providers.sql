-- Which upstream provider answered an account's requests, per UTC day (issue 14's right
-- to information about sharing, read by /settings/privacy/sharing): kept by ingest in the
-- same statement as the usage rows, like usage_daily, so that page never scans the raw
-- logs and can answer for longer than their 30 days. No IP address, no request id, no
-- key. The account's personal data (export, deletion).
CREATE TABLE usage_daily_providers (
    account_id  uuid        NOT NULL,
    day         date        NOT NULL,      -- UTC day of received_at
    provider    text        NOT NULL,
    requests    bigint      NOT NULL,
    first_at    timestamptz NOT NULL,      -- the day's first and last request sent there
    last_at     timestamptz NOT NULL,
    PRIMARY KEY (account_id, day, provider)
);
