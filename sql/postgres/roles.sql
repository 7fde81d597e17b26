-- A least-privilege role for cdc-relay. Run as a superuser (or the table's owner for the GRANTs),
-- after schema.sql, in the database that holds user_logins. Set the password out of band:
--   ALTER ROLE cdc_relay PASSWORD '...';
-- What the relay needs and why:
--   REPLICATION                      open a replication connection, create and use its slot
--   SELECT on the table              backfill rows with sent_to_kafka = FALSE
--   UPDATE (sent_to_kafka) only      the confirmation ledger; no other column can be written
--   EXECUTE on three replication-origin functions (optional, PostgreSQL 16+): the ledger writes under
--                                    an origin the stream filters out before decoding (--ledger-origin)
--   a publication made by the owner  CREATE PUBLICATION requires owning the table, so the owner
--                                    creates it here; the relay finds it and does not need ownership
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cdc_relay') THEN
        CREATE ROLE cdc_relay LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE;
    END IF;
END
$$;
ALTER ROLE cdc_relay WITH LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE;
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO cdc_relay', current_database());
END
$$;
GRANT USAGE ON SCHEMA public TO cdc_relay;
GRANT SELECT ON user_logins TO cdc_relay;
GRANT UPDATE (sent_to_kafka) ON user_logins TO cdc_relay;
-- Superuser only; every overload, so it reads the same on PostgreSQL 14 to 18.
DO $$
DECLARE f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
             WHERE p.proname IN ('pg_replication_origin_create', 'pg_replication_origin_session_setup',
                                 'pg_replication_origin_drop')
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO cdc_relay', f);
    END LOOP;
END
$$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'cdc_relay') THEN
        CREATE PUBLICATION cdc_relay FOR TABLE user_logins WITH (publish = 'insert');
    END IF;
END
$$;
