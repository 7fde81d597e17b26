-- Reference DDL: `cdc-relay sink` creates these itself, choosing the engine by server version.
-- ClickHouse 18.16 (Debian's):
CREATE TABLE IF NOT EXISTS default.user_logins (
    id Int64,
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
-- Tables of earlier releases have `id UInt64`; they keep working, but a negative id is then
-- dead-lettered.

-- One row per applied truncate: every row with a `_version` below max(version) is gone.
CREATE TABLE IF NOT EXISTS default.user_logins_truncates (
    version UInt64,
    applied_at DateTime DEFAULT now()
) ENGINE = MergeTree ORDER BY version;

-- One current, non-deleted row per id at or above the truncate watermark, exact even before merges.
CREATE VIEW IF NOT EXISTS default.user_logins_current AS SELECT id, username, event_type, event_time, event_time_us, op, _lsn, _version FROM default.user_logins FINAL WHERE _deleted = 0 AND _version >= (SELECT max(version) FROM default.user_logins_truncates);
