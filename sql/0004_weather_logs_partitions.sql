-- Time partitioning (docs/operations.md, "Retention"). `consumer migrate` turns weather_logs into
-- a table partitioned by range of measured_at (src/partition.rs): the table it was becomes the
-- DEFAULT partition, weather_logs_default, which keeps every reading measured before the
-- conversion's cutover and every reading without measured_at; from the cutover on, one partition
-- per UTC day, weather_logs_pYYYYMMDD. The unique key is (message_id, measured_at), NULLS NOT
-- DISTINCT: a redelivered or republished reading carries the same measured_at, so it meets its
-- first copy in the same partition, and the insert skips it.

-- Besides the daily partitions, two catch-alls keep every reading storable (whatever the
-- consumer's decode accepts, PostgreSQL must accept): weather_logs_ahead holds readings measured
-- after the newest daily partition, up to MAXVALUE; weather_logs_expired, once retention has
-- dropped a day, holds readings measured on days already dropped, until the next run empties it.

-- The bounds of a partition, from the catalog.
CREATE OR REPLACE FUNCTION weather_logs_bounds(part regclass, OUT from_at timestamptz, OUT to_at timestamptz)
LANGUAGE sql STABLE
SET search_path FROM CURRENT
AS $$
    SELECT (regexp_match(b, 'FROM \(''([^'']+)''\)'))[1]::timestamptz,
           (regexp_match(b, 'TO \(''([^'']+)''\)'))[1]::timestamptz
      FROM pg_get_expr((SELECT relpartbound FROM pg_class WHERE oid = part), part) AS b
$$;

-- Creates the daily partitions after the newest one up to p_now + p_ahead days, and, unless
-- p_retention is null, drops those whose whole day ended before p_now - p_retention
-- (weather_logs_expired then covers their days, emptied at each run). weather_logs_ahead gives
-- up the days it covers: at once if it is empty; otherwise (the maintenance did not run for more
-- than p_ahead days and readings of today went there, or a station's clock is far ahead) only
-- with p_catch_up, by renaming it weather_logs_catchup, detached, whose rows `consumer maintain`
-- then moves back in small transactions (src/partition.rs), so that no lock is held while they
-- move. Run as the owner (`consumer maintain`, from a timer; `consumer migrate`). Each DDL
-- takes a brief ACCESS EXCLUSIVE lock on weather_logs; lock_timeout keeps it from queueing the
-- consumer's inserts behind a long query (it fails instead, and the next run tries again). The
-- default partition's CHECK constraint (measured_at before the first daily partition, or null)
-- lets PostgreSQL create a partition without scanning it. Returns a row per partition created
-- or dropped.
CREATE OR REPLACE FUNCTION weather_logs_maintain(p_now timestamptz, p_ahead integer, p_retention interval,
                                                 p_catch_up boolean DEFAULT true)
RETURNS TABLE (action text, partition text, from_at timestamptz, to_at timestamptz)
LANGUAGE plpgsql
SET search_path FROM CURRENT
SET lock_timeout = '2s'
SET timezone = 'UTC'
AS $$
DECLARE
    day timestamptz;
    horizon timestamptz := date_trunc('day', p_now) + make_interval(days => p_ahead + 1);
    expired_from timestamptz;
    expired_to timestamptz;
    p record;
BEGIN
    -- One run at a time, and none during a migration or the conversion's switch: the
    -- migrations' advisory lock (src/db.rs MIGRATION_LOCK), which they hold for their transaction.
    PERFORM pg_advisory_xact_lock(1397314388, hashtext(current_schema()));
    SELECT max(to_date(substr(c.relname, 15), 'YYYYMMDD'))::timestamptz + interval '1 day'
      INTO day
      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = 'weather_logs'::regclass AND c.relname ~ '^weather_logs_p[0-9]{8}$';
    IF day IS NULL THEN
        RAISE EXCEPTION 'weather_logs has no daily partitions; run `consumer migrate`';
    END IF;
    -- A populated ahead (readings of days without a partition, or of a clock far ahead) is never
    -- re-attached under the parent's lock, which would read all of it: it goes as catchup.
    IF day < horizon AND EXISTS (SELECT FROM weather_logs_ahead) THEN
        IF NOT p_catch_up OR to_regclass('weather_logs_catchup') IS NOT NULL THEN
            -- Later: in `consumer maintain`, once the previous catch-up is done.
            horizon := day;
        ELSE
            ALTER TABLE weather_logs DETACH PARTITION weather_logs_ahead;
            ALTER TABLE weather_logs_ahead RENAME TO weather_logs_catchup;
            action := 'detached'; partition := 'weather_logs_catchup'; from_at := day; to_at := NULL;
            RETURN NEXT;
            CREATE TABLE weather_logs_ahead (LIKE weather_logs INCLUDING DEFAULTS);
        END IF;
    END IF;
    IF day < horizon THEN
        IF EXISTS (SELECT FROM pg_inherits WHERE inhrelid = 'weather_logs_ahead'::regclass) THEN
            ALTER TABLE weather_logs DETACH PARTITION weather_logs_ahead;
        END IF;
        WHILE day < horizon LOOP
            partition := 'weather_logs_p' || to_char(day, 'YYYYMMDD');
            EXECUTE format('CREATE TABLE %I PARTITION OF weather_logs FOR VALUES FROM (%L) TO (%L)',
                           partition, day, day + interval '1 day');
            action := 'created'; from_at := day; to_at := day + interval '1 day';
            RETURN NEXT;
            day := day + interval '1 day';
        END LOOP;
        -- Empty (a populated one went as catchup above): ATTACH has nothing to read.
        EXECUTE format('ALTER TABLE weather_logs ATTACH PARTITION weather_logs_ahead FOR VALUES FROM (%L) TO (MAXVALUE)', horizon);
    END IF;
    IF p_retention IS NULL THEN
        RETURN;
    END IF;
    FOR p IN SELECT c.relname, to_date(substr(c.relname, 15), 'YYYYMMDD')::timestamptz AS first
               FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = 'weather_logs'::regclass AND c.relname ~ '^weather_logs_p[0-9]{8}$'
                AND to_date(substr(c.relname, 15), 'YYYYMMDD')::timestamptz + interval '1 day'
                    <= p_now - p_retention
              ORDER BY 1 LOOP
        EXECUTE format('DROP TABLE %I', p.relname);
        action := 'dropped'; partition := p.relname; from_at := p.first; to_at := p.first + interval '1 day';
        RETURN NEXT;
        expired_from := least(expired_from, p.first);
        expired_to := p.first + interval '1 day';
    END LOOP;
    IF to_regclass('weather_logs_expired') IS NOT NULL THEN
        -- Only when it holds rows: a dashboard's query over expired days would hold the lock.
        IF EXISTS (SELECT FROM weather_logs_expired) THEN
            TRUNCATE weather_logs_expired;
        END IF;
        IF expired_to IS NOT NULL THEN
            SELECT b.from_at INTO expired_from FROM weather_logs_bounds('weather_logs_expired') b;
            ALTER TABLE weather_logs DETACH PARTITION weather_logs_expired;
        END IF;
    END IF;
    IF expired_to IS NOT NULL THEN
        IF to_regclass('weather_logs_expired') IS NULL THEN
            CREATE TABLE weather_logs_expired (LIKE weather_logs INCLUDING DEFAULTS);
        END IF;
        EXECUTE format('ALTER TABLE weather_logs ATTACH PARTITION weather_logs_expired FOR VALUES FROM (%L) TO (%L)',
                       expired_from, expired_to);
    END IF;
END
$$;
REVOKE ALL ON FUNCTION weather_logs_maintain(timestamptz, integer, interval, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION weather_logs_bounds(regclass) FROM PUBLIC;

-- As in 0003, with the partitioned table's key: a reading conflicts when a different one holds its
-- message_id *and* its measured_at. (The same id with another measured_at is another key, stored
-- beside it.) Two branches so that each can use the unique index and prune partitions: equal
-- times, and both without one (only the default partition holds those).
CREATE OR REPLACE FUNCTION weather_logs_conflicts(
    ids uuid[], stations text[], temperatures float8[], humidities float8[], pressures float8[],
    measured timestamptz[]
) RETURNS SETOF uuid
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
    SELECT w.message_id
    FROM unnest(ids, stations, temperatures, humidities, pressures, measured)
             AS t(id, station_id, temperature, humidity, pressure, measured_at)
    JOIN weather_logs w ON w.message_id = t.id AND w.measured_at = t.measured_at
    WHERE (w.station_id, w.temperature, w.humidity, w.pressure)
          IS DISTINCT FROM (t.station_id, t.temperature, t.humidity, t.pressure)
    UNION ALL
    SELECT w.message_id
    FROM unnest(ids, stations, temperatures, humidities, pressures, measured)
             AS t(id, station_id, temperature, humidity, pressure, measured_at)
    JOIN weather_logs w ON w.message_id = t.id AND w.measured_at IS NULL
    WHERE t.measured_at IS NULL
      AND (w.station_id, w.temperature, w.humidity, w.pressure)
          IS DISTINCT FROM (t.station_id, t.temperature, t.humidity, t.pressure)
$$;
