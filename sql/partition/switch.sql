-- The switch to a partitioned weather_logs (src/partition.rs), in one transaction, with {cutover}
-- and {next} replaced by timestamptz literals (the start of a UTC day, and of the next), {day} by
-- the cutover's date (YYYYMMDD). Before it runs on a table with rows,
-- `consumer migrate` has built the unique index (concurrently) and validated the CHECK constraint
-- that keeps the old rows before the cutover, so that here nothing scans the table: writers wait
-- for the few milliseconds this takes (docs/operations.md, "Retention"). On an empty table both
-- are made here. Applied with search_path set to the schema.
LOCK TABLE weather_logs IN ACCESS EXCLUSIVE MODE;
CREATE UNIQUE INDEX IF NOT EXISTS weather_logs_default_key
    ON weather_logs (message_id, measured_at) NULLS NOT DISTINCT;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'weather_logs'::regclass AND conname = 'weather_logs_default_range') THEN
        ALTER TABLE weather_logs ADD CONSTRAINT weather_logs_default_range
            CHECK (measured_at IS NULL OR measured_at < {cutover});
    END IF;
END
$$;
ALTER TABLE weather_logs RENAME TO weather_logs_default;
ALTER TABLE weather_logs_default DROP CONSTRAINT IF EXISTS weather_logs_pkey;
ALTER INDEX IF EXISTS weather_logs_station_measured_at_idx RENAME TO weather_logs_default_station_measured_at_idx;
CREATE TABLE weather_logs (LIKE weather_logs_default INCLUDING DEFAULTS) PARTITION BY RANGE (measured_at);
COMMENT ON TABLE weather_logs IS 'Weather readings, partitioned by day of measured_at (sistema-mensajes)';
-- On the parent, before the default partition is attached: its indexes of the same definition are
-- attached with it, not built again.
CREATE UNIQUE INDEX weather_logs_key ON weather_logs (message_id, measured_at) NULLS NOT DISTINCT;
CREATE INDEX weather_logs_station_measured_at_idx ON weather_logs (station_id, measured_at);
ALTER TABLE weather_logs ATTACH PARTITION weather_logs_default DEFAULT;
-- Whoever could use the old table may use the new one: its table privileges, copied (the
-- writer's INSERT, the reader's SELECT). Not its column privileges: the only one we granted,
-- SELECT (message_id) to the writer, is no longer needed, and `consumer migrate` revokes it.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT a.privilege_type AS privilege,
                    CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END AS grantee
               FROM pg_class c, aclexplode(c.relacl) a
              WHERE c.oid = 'weather_logs_default'::regclass AND a.grantee <> c.relowner LOOP
        EXECUTE format('GRANT %s ON weather_logs TO %s', g.privilege, g.grantee);
    END LOOP;
END
$$;
CREATE TABLE weather_logs_p{day} PARTITION OF weather_logs
    FOR VALUES FROM ({cutover}) TO ({next});
-- Everything measured later, until weather_logs_maintain makes its days (partition.rs: at once).
CREATE TABLE weather_logs_ahead PARTITION OF weather_logs FOR VALUES FROM ({next}) TO (MAXVALUE);
INSERT INTO schema_migrations (version) VALUES ('weather_logs_partitioned');
