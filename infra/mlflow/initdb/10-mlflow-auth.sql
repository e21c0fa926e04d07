-- The user store of MLflow's basic-auth app, beside the tracking database (PostgreSQL runs the scripts in
-- /docker-entrypoint-initdb.d/ once, on an empty data volume; on an existing volume run this file by hand:
--   docker compose -f infra/mlflow/docker-compose.yml exec -T postgres psql -U mlflow < infra/mlflow/initdb/10-mlflow-auth.sql
CREATE DATABASE mlflow_auth OWNER mlflow;
