-- Which of the given readings find their message_id held by a *different* stored reading: a
-- publisher reusing an id, not a redelivery. The consumer calls it only when an insert skipped
-- rows, and counts those apart from duplicates (consumer_messages_conflicting_total).
-- SECURITY DEFINER: it runs with the owner's right to read weather_logs, so the consumer's role
-- needs EXECUTE on it and INSERT on the table, not SELECT. Its search path is fixed to the schema
-- it is created in (the migration sets it to that schema, then pg_temp), so a caller cannot
-- substitute objects of its own.
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
    JOIN weather_logs w ON w.message_id = t.id
    WHERE (w.station_id, w.temperature, w.humidity, w.pressure, w.measured_at)
          IS DISTINCT FROM (t.station_id, t.temperature, t.humidity, t.pressure, t.measured_at)
$$;
REVOKE ALL ON FUNCTION weather_logs_conflicts(uuid[], text[], float8[], float8[], float8[], timestamptz[])
    FROM PUBLIC;
