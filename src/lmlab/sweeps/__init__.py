"""Sweeps: a YAML spec, an Optuna study and one MLflow child run per condition."""
