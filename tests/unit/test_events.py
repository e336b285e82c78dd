"""The train-on-publish trigger as the Prefect server receives it, and the events' resources (no server: the
end-to-end run is tests/integration/test_train_on_publish.py and the stack test)."""

from __future__ import annotations

import uuid

import pytest

from flows.deployments import TRAIN_DEPLOYMENT, build_deployments, train_on_publish_trigger
from tasks.events import DATASET_PUBLISHED, dataset_resource, emit_dataset_published
from vlforge.datasets import DatasetVersion
from vlforge.errors import VlforgeError
from vlforge.settings import get_settings


def test_trigger_runs_train_once_per_published_version_of_its_dataset_only():
    trigger = train_on_publish_trigger("web")
    trigger.set_deployment_id(uuid.uuid4())
    automation = trigger.as_automation()
    assert automation.trigger.expect == {DATASET_PUBLISHED}
    assert automation.trigger.match.model_dump() == {"vlforge.dataset.name": "web"}
    assert automation.trigger.threshold == 1 and automation.trigger.posture.value == "Reactive"
    (action,) = automation.actions
    assert action.parameters == {"params": {"dataset": "{{ event.resource['vlforge.dataset.ref'] }}"}}
    # What the template reads is the version's ref.
    assert dataset_resource("web", "20261203T000000Z-ab")["vlforge.dataset.ref"] == "web@20261203T000000Z-ab"


@pytest.mark.parametrize("bad", ["web@20261203T000000Z-ab", "no spaces"])
def test_trigger_takes_a_dataset_name(bad):
    with pytest.raises(VlforgeError):
        train_on_publish_trigger(bad)


def test_only_the_train_deployment_gets_the_trigger(tmp_path):
    deployments = build_deployments(get_settings(storage=str(tmp_path)), train_on_publish="web")
    triggers = {d.name: len(d.triggers) for d in deployments}
    assert triggers.pop(TRAIN_DEPLOYMENT) == 1
    assert set(triggers.values()) == {0}
    assert all(not d.triggers for d in build_deployments(get_settings(storage=str(tmp_path))))


def test_no_api_and_no_flow_run_emits_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    dv = DatasetVersion("web", "v1", str(tmp_path), {"counts": {"kept": 1}, "content_hash": "ab"})
    assert emit_dataset_published(dv) is None
