-- Two event fields added within schema version 1: the upstream attempts a request
-- made (retries and fallbacks included) and its cache-write tokens (part of
-- prompt_tokens, priced on their own by providers that have a price for them).
-- Constant defaults: Postgres adds them without rewriting any partition, and rows
-- stored before this migration read as what an event without the fields means.
ALTER TABLE usage_logs
    ADD COLUMN attempts            integer NOT NULL DEFAULT 1,
    ADD COLUMN cache_write_tokens  bigint  NOT NULL DEFAULT 0;
