"""Eval sets as datasets of their own: promotion compares models on an eval set only when every model's
training data was decontaminated against that very version (tasks.promotion.contamination_problem)."""

from __future__ import annotations

from tasks.promotion import contamination_problem
from tests.helpers import publish_pairs
from vlforge.demo.synth import make_pairs


def _publish(settings, name, seed, **manifest):
    return publish_pairs(settings, name, make_pairs(8, seed=seed), manifest=manifest)


def test_a_comparison_on_an_eval_set_needs_every_training_set_decontaminated_against_it(settings):
    ev = _publish(settings, "ev", 1, eval_set=True)
    clean = _publish(settings, "clean", 2, decontamination={"against": [ev.ref]})
    dirty = _publish(settings, "dirty", 3, decontamination={"against": []})
    old = _publish(settings, "old", 4)  # published before decontamination existed

    assert contamination_problem(settings, ev.ref, {"models:/m/1": clean.ref}) is None
    assert contamination_problem(settings, f"{ev.ref}#heldout0.5", {"models:/m/1": clean.ref}) is None
    for train in (dirty, old):
        problem = contamination_problem(
            settings, ev.ref, {"models:/m/2": clean.ref, "models:/m/1": train.ref}
        )
        assert problem is not None and problem.startswith(f"refused to compare on eval set {ev.ref}")
        assert f"models:/m/1 was trained on {train.ref}" in problem
        assert f"--decontaminate-against {ev.ref}" in problem
    unknown = contamination_problem(settings, ev.ref, {"models:/m/3": None})
    assert unknown is not None and "records no training dataset" in unknown
    # A new version of the eval set: data decontaminated against the old one is not enough.
    ev2 = _publish(settings, "ev", 5, eval_set=True)
    assert ev2.ref != ev.ref
    assert "was not decontaminated" in contamination_problem(settings, "ev", {"models:/m/1": clean.ref})
    # Data that is not an eval set (a training set's own held-out split) needs no such check.
    assert contamination_problem(settings, f"{dirty.ref}#heldout0.2", {"models:/m/1": dirty.ref}) is None
    # Training on the eval set itself is refused even if its manifest claims otherwise.
    assert contamination_problem(settings, ev2.ref, {"models:/m/1": ev2.ref}) is not None
