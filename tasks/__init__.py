"""One module per stage: plain functions that do the work, plus the @task wrappers Prefect runs."""
