-- Reference DDL: `cdc-relay sink` creates these itself, choosing the engine by server version.
-- ClickHouse 18.16 (Debian's):
CREATE TABLE IF NOT EXISTS default.user_logins (
    id UInt64,
    username Nullable(String),
    event_type Nullable(String),
    event_time Nullable(DateTime),
    event_time_us Nullable(Int64),
    op String,
    _lsn String,
    _version UInt64,
    _deleted UInt8,
    _ingested_at DateTime DEFAULT now()
) ENGINE = ReplacingMergeTree(_version) ORDER BY id;
-- ClickHouse 23.2 and later: the same columns with
--   ENGINE = ReplacingMergeTree(_version, _deleted) ORDER BY id

-- One current, non-deleted row per id, exact even before merges.
CREATE VIEW IF NOT EXISTS default.user_logins_current AS
SELECT id, username, event_type, event_time, event_time_us, op, _lsn, _version
FROM default.user_logins FINAL
WHERE _deleted = 0;
