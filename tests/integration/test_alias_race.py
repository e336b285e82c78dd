"""Two processes that set one alias of one model at the same moment, on MLflow's PostgreSQL store.

MLflow sets an alias by a read, then an insert or an update. Here a second connection inserts the alias row
and holds its transaction open while vlforge sets the alias: vlforge's read sees no row, its insert waits on
the row's unique key, and when the other transaction commits the insert breaks the key (``UniqueViolation``),
as it did in CI when two pipelines promoted at once. vlforge must try again and win, as the last writer.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.integration.servers import postgres_server
from vlforge import tracking
from vlforge.settings import Settings

pytestmark = pytest.mark.integration

MODEL = "vlforge-race"


def test_alias_set_by_another_process_at_the_same_moment_is_set_again(tmp_path):
    import psycopg2
    from mlflow import MlflowClient

    with postgres_server(tmp_path / "pg", "vlforge", "race-pw") as pg:
        uri = pg.url("mlflow", "postgresql+psycopg2")
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # creates MLflow's tables
        client.create_registered_model(MODEL)
        for _ in range(2):
            client.create_model_version(MODEL, source=str(tmp_path / "model"))

        other = psycopg2.connect(
            host=pg.host, port=pg.port, user=pg.user, password=pg.password, dbname="mlflow"
        )
        try:
            with other.cursor() as cur:
                cur.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = 'registered_model_aliases'"
                )
                columns = {row[0] for row in cur.fetchall()}
                row = {"name": MODEL, "alias": "champion", "version": 1}
                if "workspace" in columns:  # MLflow >= 3.6 keys aliases by workspace too
                    row["workspace"] = "default"
                cur.execute(
                    f"INSERT INTO registered_model_aliases ({', '.join(row)}) "
                    f"VALUES ({', '.join(['%s'] * len(row))})",
                    list(row.values()),
                )  # not committed: vlforge's read below does not see it

            errors: list[BaseException] = []

            def set_champion() -> None:
                try:
                    tracking.set_alias(Settings(mlflow_tracking_uri=uri), MODEL, "champion", "2")
                except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                    errors.append(exc)

            setter = threading.Thread(target=set_champion)
            setter.start()
            time.sleep(3)  # vlforge's insert now waits on the other transaction's row
            assert setter.is_alive(), f"set_alias did not wait on the other transaction: {errors}"
            other.commit()
            setter.join(60)
            assert not setter.is_alive()
        finally:
            other.close()
        assert errors == []
        assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "2"
