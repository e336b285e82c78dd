"""Synthetic demo data with a known truth, and a small HTTP server on 127.0.0.1 that serves it."""
