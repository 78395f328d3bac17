-- The readings dashboard (grafana/dashboards/readings.json) asks, per station: the readings
-- between two instants ($__timeFilter(measured_at)), the latest reading, and the list of
-- stations. Without this index each of those reads the whole table; with it, only the rows
-- asked for (.ci/observability checks with EXPLAIN). Built inside the migration's transaction,
-- so on a large existing table it blocks inserts while it builds: the consumer's inserts wait
-- and resume by themselves.
CREATE INDEX IF NOT EXISTS weather_logs_station_measured_at_idx
    ON weather_logs (station_id, measured_at);
