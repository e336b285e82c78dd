"""Promotion by evidence: which registered version serves as ``champion``, decided on paired comparisons.

A new version becomes ``champion`` only when it beats the current champion on the same eval pairs by a
paired-bootstrap margin whose 95% interval lies above zero (on the primary metric: zero-shot accuracy when the
data has labels, else mean recall); otherwise it becomes ``challenger``. A fine-tune is also compared with
**its base**: it must beat the base on its domain eval set (interval above zero) and be shown not to lose more
than ``general_margin`` on a general eval set, by default the base's own held-out data: a non-inferiority test,
passed when the lower bound of the 95% interval of (fine-tune - base) lies above ``-general_margin``. A point loss
under the margin is not enough: on few or noisy general pairs the interval is wide, and a fine-tune that may
have forgotten more than the margin is not promoted on the chance that it did not. The first version of a registered model has nothing to be compared with: it becomes champion
(a fine-tune only when it passes the gate against its base), and its tags say so.

Every figure goes into the version's tags, the training run's metrics and the returned :class:`Decision`, which
the CLI prints. :func:`override` is a person's decision (``vlforge promote``), recorded with who and why.
"""

from __future__ import annotations

import datetime as dt
import getpass
import logging
from dataclasses import asdict, dataclass, field

from tasks.evaluate import MEAN_RECALL, Evaluation, Interval, mlflow_metric_names, paired_difference
from vlforge import defaults
from vlforge.errors import ModelNotFoundError, VlforgeError
from vlforge.settings import Settings

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
DEFAULT_GENERAL_MARGIN = defaults.GENERAL_MARGIN
TAG_EVAL_DATA = "vlforge.eval_data"  # the pairs the version was decided on
TAG_HELDOUT_DATA = "vlforge.heldout_data"  # its training data's held-out split: a fine-tune's general set
TAG_DECISION = "vlforge.promotion"  # the reason, in words
TAG_DECIDED_ALIAS = "vlforge.promotion.alias"
TAG_PROMOTED_BY = "vlforge.promotion.by"  # a person's override: who, and when
TAG_PROMOTED_AT = "vlforge.promotion.at"
VS_CHAMPION, VS_BASE_DOMAIN, VS_BASE_GENERAL = "vs_champion", "vs_base_domain", "vs_base_general"


@dataclass(frozen=True)
class Comparison:
    """The new version against another model on the same eval pairs, paired bootstrap on ``metric``."""

    kind: str  # vs_champion, vs_base_domain or vs_base_general
    other: str  # models:/NAME/N it was compared with
    eval_data: str
    num_pairs: int
    metric: str
    new: Interval
    old: Interval
    difference: Interval  # new - old, paired

    @property
    def beats(self) -> bool:
        return self.difference.low > 0

    def describe(self) -> str:
        return (
            f"{self.metric} {self.new} against {self.old} of {self.other} on {self.num_pairs} pairs of "
            f"{self.eval_data}: difference {self.difference}"
        )

    def figures(self) -> dict[str, float]:
        """Figures named for MLflow metrics and tags: ``<kind>_<metric>_diff``, its interval, both values."""
        base = f"{self.kind}_{self.metric}"
        figures = {
            f"{base}_diff": self.difference.value,
            f"{base}_diff_ci_low": self.difference.low,
            f"{base}_diff_ci_high": self.difference.high,
            f"{base}_new": self.new.value,
            f"{base}_other": self.old.value,
            f"{base}_other_ci_low": self.old.low,
            f"{base}_other_ci_high": self.old.high,
        }
        return mlflow_metric_names(figures, prefix="")


def compare(kind: str, new: Evaluation, old: Evaluation, other: str) -> Comparison:
    """Paired comparison of two evaluations of the same pairs on the new one's primary metric (mean recall
    when the other model was evaluated without labels)."""
    if new.eval_data != old.eval_data or new.num_pairs != old.num_pairs:
        raise ValueError(
            f"cannot pair evaluations of different data: {new.eval_data!r} ({new.num_pairs} pairs) and "
            f"{old.eval_data!r} ({old.num_pairs} pairs)"
        )
    metric = new.primary_metric if new.primary_metric in old.per_pair else MEAN_RECALL
    diff = paired_difference(new.per_pair[metric], old.per_pair[metric])
    return Comparison(
        kind, other, new.eval_data, new.num_pairs, metric, new.intervals[metric], old.intervals[metric], diff
    )


@dataclass(frozen=True)
class Decision:
    alias: str
    reason: str
    comparisons: tuple[Comparison, ...] = ()
    promoted_by: str | None = None  # set when a person decided (vlforge promote)

    def comparison(self, kind: str) -> Comparison | None:
        return next((c for c in self.comparisons if c.kind == kind), None)

    def lines(self) -> list[str]:
        """The decision for people: alias and reason, then each comparison with its interval."""
        who = f" by {self.promoted_by}" if self.promoted_by else ""
        out = [f"{self.alias}{who}: {self.reason}"]
        out += [f"  {c.kind.replace('_', ' ')}: {c.describe()}" for c in self.comparisons]
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def keeps_general_data(vs_base_general: Comparison, general_margin: float) -> bool:
    """Non-inferiority on the general set: the lower 95% bound of (fine-tune - base) lies above
    ``-general_margin`` (a loss of more than the margin is ruled out, not merely unlikely on the point)."""
    return vs_base_general.difference.low > -general_margin


def decide(
    vs_champion: Comparison | None,
    *,
    has_champion: bool,
    fine_tune: bool = False,
    vs_base_domain: Comparison | None = None,
    vs_base_general: Comparison | None = None,
    general_margin: float = DEFAULT_GENERAL_MARGIN,
    missing: str = "",
) -> Decision:
    """The promotion rule on comparisons alone (see the module docstring). ``missing`` says why a comparison
    the rule needs could not be made; such a version stays challenger."""
    done = tuple(c for c in (vs_champion, vs_base_domain, vs_base_general) if c is not None)

    def challenger(reason: str) -> Decision:
        return Decision(CHALLENGER, reason, done)

    if fine_tune:
        if vs_base_domain is None or vs_base_general is None:
            return challenger(f"not compared with its base ({missing or 'no base model recorded'})")
        if not vs_base_domain.beats:
            return challenger(
                f"does not beat its base on the domain beyond noise ({vs_base_domain.metric} difference "
                f"{vs_base_domain.difference}; the 95% interval must lie above 0)"
            )
        if not keeps_general_data(vs_base_general, general_margin):
            diff = vs_base_general.difference
            return challenger(
                f"forgets general data: {vs_base_general.metric} {diff.value:+.4f} against its base, and the 95% "
                f"interval [{diff.low:+.4f}, {diff.high:+.4f}] reaches below -{general_margin:g} (non-inferiority: "
                f"its lower bound must lie above minus the margin {general_margin:g})"
            )
    if not has_champion:
        gate = (
            "; beats its base on the domain and keeps general data within the margin (95% lower bound)"
            if fine_tune
            else ""
        )
        return Decision(
            CHAMPION, f"first version: no champion to compare with, so not shown better than one{gate}", done
        )
    if vs_champion is None:
        return challenger(f"not compared with the champion ({missing or 'no comparable evaluation'})")
    if not vs_champion.beats:
        return challenger(
            f"does not beat champion {vs_champion.other} beyond noise ({vs_champion.metric} difference "
            f"{vs_champion.difference}; the 95% interval must lie above 0)"
        )
    return Decision(
        CHAMPION,
        f"beats champion {vs_champion.other}: {vs_champion.metric} difference {vs_champion.difference}",
        done,
    )


@dataclass
class _Evaluator:
    """Evaluates other models on eval-data names, reading each set of pairs once."""

    settings: Settings
    class_prompts: list[str] | None
    tables: dict = field(default_factory=dict)

    def __call__(self, model, eval_data: str) -> Evaluation:
        from tasks.common import load_model
        from tasks.evaluate import evaluate
        from tasks.train.data import read_eval_data

        if eval_data not in self.tables:
            self.tables[eval_data] = read_eval_data(eval_data, self.settings)
        bundle = load_model(model, self.settings) if isinstance(model, str) else model
        return evaluate(bundle, self.tables[eval_data], eval_data, class_prompts=self.class_prompts)


def promote(
    client,
    name: str,
    version: str,
    evaluation: Evaluation,
    *,
    settings: Settings,
    run_id: str | None = None,
    bundle=None,
    base_model: str | None = None,
    fine_tune: bool = False,
    general_eval: str | None = None,
    general_margin: float = DEFAULT_GENERAL_MARGIN,
    evaluator=None,
) -> Decision:
    """Decide ``name``/``version`` (just registered, evaluated as ``evaluation``), set its alias, record why.

    The champion (and, for a fine-tune, ``base_model``) is loaded and evaluated on ``evaluation.eval_data``
    here, so both sides of each comparison see the same pairs. A fine-tune's general set is ``general_eval``
    or the base's held-out data (its version's tag); ``bundle`` is the new model (loaded from the registry
    when not given) for that set. Figures go to the version's tags and, with ``run_id``, the run's metrics.
    ``evaluator(model, eval_data) -> Evaluation`` evaluates another model (a URI or a loaded one) on an
    eval-data name; default: a CLIP's evaluation (``tasks.evaluate.evaluate``).
    """
    if evaluator is None:
        evaluator = _Evaluator(settings, list(evaluation.class_prompts or ()) or None)
    champion = _alias_version(client, name, CHAMPION)
    has_champion = champion is not None and str(champion.version) != str(version)
    trained_on = {f"models:/{name}/{version}": _training_dataset(client, run_id)}
    if has_champion:
        trained_on[f"models:/{name}/{champion.version}"] = _training_dataset(client, champion.run_id)
    problem = contamination_problem(settings, evaluation.eval_data, trained_on)
    if problem is not None:
        decision = Decision(CHALLENGER, problem)
        record(settings, name, version, decision, run_id=run_id)
        return decision
    vs_champion = domain = general = None
    missing = []
    if has_champion:
        uri = f"models:/{name}/{champion.version}"
        try:
            vs_champion = compare(VS_CHAMPION, evaluation, evaluator(uri, evaluation.eval_data), uri)
        except VlforgeError as exc:
            missing.append(f"champion: {exc}")
    if fine_tune and base_model:
        try:
            base = _pinned(base_model, settings)
            general_ref = general_eval or _heldout_data(base, settings)
            domain = compare(VS_BASE_DOMAIN, evaluation, evaluator(base, evaluation.eval_data), base)
            if general_ref is None:
                raise VlforgeError(f"{base} records no held-out data; give a general eval set")
            new_model = bundle if bundle is not None else f"models:/{name}/{version}"
            general = compare(
                VS_BASE_GENERAL, evaluator(new_model, general_ref), evaluator(base, general_ref), base
            )
        except VlforgeError as exc:
            missing.append(f"base: {exc}")
    decision = decide(
        vs_champion,
        has_champion=has_champion,
        fine_tune=fine_tune,
        vs_base_domain=domain,
        vs_base_general=general,
        general_margin=general_margin,
        missing="; ".join(missing),
    )
    record(settings, name, version, decision, run_id=run_id)
    return decision


def record(
    settings: Settings, name: str, version: str, decision: Decision, *, run_id: str | None = None
) -> None:
    """Set the alias; the reason and every comparison's figures as version tags (and run metrics)."""
    from vlforge import tracking

    tracking.set_alias(settings, name, decision.alias, str(version))
    tags = {TAG_DECISION: decision.reason[:4000], TAG_DECIDED_ALIAS: decision.alias}
    for c in decision.comparisons:
        tags[f"vlforge.{c.kind}.model"] = c.other
        tags[f"vlforge.{c.kind}.eval_data"] = c.eval_data
        tags.update({f"vlforge.{k}": f"{v:.6g}" for k, v in c.figures().items()})
        if run_id is not None:
            tracking.log_to_run(settings, run_id, metrics=c.figures())
    tracking.set_version_tags(settings, name, str(version), tags)
    log.info("%s version %s -> %s (%s)", name, version, decision.alias, decision.reason)


def override(
    uri: str, alias: str, settings: Settings, *, reason: str | None = None, user: str | None = None
) -> Decision:
    """A person's decision: give the registered version ``uri`` the ``alias`` (``vlforge promote``), recorded
    in its tags with who, when and why."""
    from vlforge import tracking
    from vlforge.naming import check_alias
    from vlforge.registry import registered_version

    check_alias(alias)
    if uri.startswith("models:/"):
        from vlforge.registry import parse_models_uri

        name, version, current = parse_models_uri(uri)
        if version is None and current is None:
            raise ModelNotFoundError(f"promote needs the version to promote: models:/{name}/N, got {uri!r}")
    mv = registered_version(uri, settings)
    if mv is None:
        raise ModelNotFoundError(f"promote needs a registered model URI (models:/NAME/N), got {uri!r}")
    client = tracking.configure(settings)  # reads
    previous = _alias_version(client, mv.name, alias)
    user = user or _current_user()
    text = f"set by hand: {reason or 'no reason given'}"
    if previous is not None and str(previous.version) != str(mv.version):
        text += f" (replaces version {previous.version})"
    tracking.set_alias(settings, mv.name, alias, str(mv.version))
    if alias == CHAMPION and CHALLENGER in (mv.aliases or []):
        tracking.delete_alias(settings, mv.name, CHALLENGER)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    tags = {TAG_DECISION: text[:4000], TAG_DECIDED_ALIAS: alias, TAG_PROMOTED_BY: user, TAG_PROMOTED_AT: now}
    tracking.set_version_tags(settings, mv.name, str(mv.version), tags)
    log.info("%s version %s -> %s by %s (%s)", mv.name, mv.version, alias, user, text)
    if alias == CHAMPION:  # a person's promotion is news too (vlforge.model.promoted), like the rule's
        from tasks.events import emit_model_promoted

        emit_model_promoted(mv.name, str(mv.version), reason=f"{text} (by {user})")
    return Decision(alias, text, promoted_by=user)


def _current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (some containers)
        return "unknown"


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _pinned(uri: str, settings: Settings) -> str:
    """``models:/NAME@ALIAS`` as the version it names now; other URIs unchanged."""
    from vlforge.registry import registered_version

    mv = registered_version(uri, settings)
    return f"models:/{mv.name}/{mv.version}" if mv is not None else uri


def _heldout_data(uri: str, settings: Settings) -> str | None:
    """The eval-data name of a registered model's held-out split (else the data it was decided on)."""
    from vlforge.registry import registered_version

    mv = registered_version(uri, settings)
    tags = (mv.tags or {}) if mv is not None else {}
    return tags.get(TAG_HELDOUT_DATA) or tags.get(TAG_EVAL_DATA)


def contamination_problem(
    settings: Settings, eval_data: str, trained_on: dict[str, str | None]
) -> str | None:
    """Why models cannot be compared on ``eval_data`` (None: they can). ``trained_on`` maps each model to the
    dataset version it was trained on (``NAME@VERSION``; None: not recorded).

    When ``eval_data`` is (a split of) a version marked an eval set (``vlforge curate --eval-set``), every
    model's training data must have been decontaminated against that very version (its manifest's
    ``decontamination.against``, ``vlforge curate --decontaminate-against``): a model that trained on copies
    of the eval images would be favoured by the comparison."""
    from tasks.train.data import HELDOUT
    from vlforge.datasets import DatasetNotFoundError, resolve_dataset

    try:
        ev = resolve_dataset(settings, eval_data.partition(HELDOUT)[0])
    except DatasetNotFoundError:
        return None  # not a dataset of ours (the evaluation reads it, and fails clearly there)
    if not ev.manifest.get("eval_set"):
        return None
    for model, dataset in trained_on.items():
        if not dataset:
            return (
                f"refused to compare on eval set {ev.ref}: {model} records no training dataset, so nothing "
                "shows its training data was decontaminated against the eval set"
            )
        try:
            train = resolve_dataset(settings, dataset)
        except DatasetNotFoundError:
            return f"refused to compare on eval set {ev.ref}: {model}'s training data {dataset} is gone"
        against = (train.manifest.get("decontamination") or {}).get("against") or []
        if train.name == ev.name or ev.ref not in against:
            return (
                f"refused to compare on eval set {ev.ref}: {model} was trained on {train.ref}, which was not "
                f"decontaminated against it (checked against: {', '.join(against) or 'none'}); curate the "
                f"training data again with --decontaminate-against {ev.ref} and retrain"
            )
    return None


def _training_dataset(client, run_id: str | None) -> str | None:
    """The dataset version a training run read (its ``dataset`` param), if the run is known."""
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).data.params.get("dataset")
    except MlflowException:
        return None
