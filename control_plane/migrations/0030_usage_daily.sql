-- Daily rollups of usage per account x key x model (issue 12): what the dashboard's
-- charts and totals read, so no page scans usage_logs. Written by ingest in the same
-- statement as the usage rows, from exactly the rows that statement inserted, so a
-- redelivered event adds nothing. No IP address and no request id: rollups may outlive
-- the 30-day log retention. They are the account's personal data (export, deletion).
CREATE TABLE usage_daily (
    account_id          uuid   NOT NULL,
    day                 date   NOT NULL,               -- UTC day of received_at
    key_id              text   NOT NULL,               -- '' for a request without a key
    model               text   NOT NULL,               -- served, else requested, else ''
    requests            bigint NOT NULL,
    errors              bigint NOT NULL,               -- outcome other than 'ok'
    prompt_tokens       bigint NOT NULL,
    completion_tokens   bigint NOT NULL,
    cached_tokens       bigint NOT NULL,
    reasoning_tokens    bigint NOT NULL,
    cache_write_tokens  bigint NOT NULL,
    cost_micros         bigint NOT NULL,
    PRIMARY KEY (account_id, day, key_id, model)
);
