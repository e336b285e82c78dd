"""Prefect flows (thin: they call tasks in order and pass URIs), deployments, and the CLI."""
