"""Thin layers around the pure ``ddpm`` library: the CLI, MLflow tracking, and Prefect flows."""
