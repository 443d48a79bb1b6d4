-- Runs once, when the postgres volume is initialised: MLflow's backend store lives in its own
-- database (MLflow and Optuna both keep an alembic_version table, so they cannot share one).
CREATE DATABASE mlflow;
