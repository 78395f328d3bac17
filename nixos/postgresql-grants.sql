-- Run by the postgres superuser in the pipeline's database (sistema-mensajes-postgresql-grants.service,
-- at every boot; idempotent), with psql variables owner, writer, reader and schema:
--   psql -d weather -v owner=weather -v writer=weather_writer -v reader=weather_reader -v schema=public \
--     -f postgresql-grants.sql
-- The reader role may connect and read weather_logs, and nothing else, one statement for at most
-- 30 s. The migrations (`consumer migrate`, as the owner) create weather_logs, perhaps long after
-- this runs, so an event trigger grants SELECT on it when it is created; if it exists already, it
-- is granted here. The writer's grants on the tables are `consumer migrate`'s: it knows what its
-- migrations create.
\set ON_ERROR_STOP on
\set table :schema '.weather_logs'
-- Run as the superuser in a database whose `public` schema the owner may write: with the default
-- search path, an overload the owner planted there (`public.format(text, name, text)`) would run
-- as the superuser. Only the catalog, then our temporary objects, are searched.
SET search_path = pg_catalog, pg_temp;

SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), r)
  FROM unnest(ARRAY[:'writer', :'reader']) AS r \gexec
-- A dashboard's query over a long range must not hold a connection, and its snapshot, for ever.
SELECT format('ALTER ROLE %I SET statement_timeout = %L', :'reader', '30s') \gexec
-- `consumer migrate` would create a schema other than public itself; created here so USAGE can be granted.
SELECT format('CREATE SCHEMA IF NOT EXISTS %I AUTHORIZATION %I', :'schema', :'owner') \gexec
-- A database from before PostgreSQL 15 has `public` owned by postgres with CREATE for everyone,
-- which `consumer migrate` refuses (the writer could plant objects there): the owner owns it,
-- and only the owner creates in it.
SELECT format('ALTER SCHEMA %I OWNER TO %I', :'schema', :'owner') \gexec
SELECT format('REVOKE CREATE ON SCHEMA %I FROM PUBLIC', :'schema') \gexec
SELECT format('GRANT USAGE ON SCHEMA %I TO %I', :'schema', :'reader') \gexec

-- The event trigger's function lives in a schema of the superuser's own, with a fixed search path:
-- in `public` the owner could drop it and plant another, and a superuser's CREATE TABLE would
-- run it. (Earlier versions put it in `public`; it goes.)
DROP EVENT TRIGGER IF EXISTS sistema_mensajes_grant_reader;
DROP FUNCTION IF EXISTS public.sistema_mensajes_grant_reader();
CREATE SCHEMA IF NOT EXISTS sistema_mensajes_admin AUTHORIZATION CURRENT_USER;
REVOKE ALL ON SCHEMA sistema_mensajes_admin FROM PUBLIC;

-- A failure here must never fail the consumer's migration: it only warns.
SELECT format($fn$
CREATE OR REPLACE FUNCTION sistema_mensajes_admin.grant_reader() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
  obj record;
BEGIN
  FOR obj IN SELECT * FROM pg_event_trigger_ddl_commands() WHERE command_tag = 'CREATE TABLE' LOOP
    IF obj.objid = to_regclass(%L) THEN
      BEGIN
        EXECUTE format('GRANT SELECT ON %%s TO %%I', obj.object_identity, %L);
      EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'sistema-mensajes: cannot grant SELECT on %% to %%: %%', obj.object_identity, %L, SQLERRM;
      END;
    END IF;
  END LOOP;
END
$body$
$fn$, :'table', :'reader', :'reader') \gexec

CREATE EVENT TRIGGER sistema_mensajes_grant_reader ON ddl_command_end
  WHEN TAG IN ('CREATE TABLE') EXECUTE FUNCTION sistema_mensajes_admin.grant_reader();

SELECT format('GRANT SELECT ON %s TO %I', to_regclass(:'table'), :'reader')
  WHERE to_regclass(:'table') IS NOT NULL \gexec
