"""Pipelines: several runs in one YAML, each stage's model the next stage's input.

A config with a top-level ``stages:`` list is a pipeline (docs/config.md, "Pipelines")::

    model: embedded:smollm2-135m-instruct        # the first stage's starting weights
    output_dir: runs/sft-dpo                     # stage NAME writes to runs/sft-dpo/NAME
    data: {train: bundled:prefs_train.jsonl, max_length: 128}
    stages:
      - {name: sft, method: sft, max_steps: 20, learning_rate: 1.0e-5}
      - {name: dpo, method: dpo, beta: 0.1, reference: {kind: cached}}   # starts from sft/model

The rules, in the order they are applied:

* Every top-level key except ``stages``, ``model`` and ``output_dir`` is a shared default: a stage's own
  keys win, and sections (``data``, ``reference``, ``lora``) merge key by key. A shared method
  hyperparameter (``beta`` ...) goes only to the stages whose method takes it, and must be taken by one.
* A stage's ``name`` defaults to ``N-method`` (N counts from 0, as in ``stages[N]`` and ``--set stages.N.``);
  it writes to ``output_dir/NAME``. The first stage starts from the top-level ``model``; a later stage
  without ``model`` starts from the previous stage's ``model/``. The reference of a DPO-style stage is
  its starting weights (the training loop's rule), so after SFT it is the SFT model, unless the stage's
  ``reference.model`` names another.
* ``stage:NAME`` anywhere in a stage's values (``model: stage:sft``, a ``reward_model`` reward's
  ``path: stage:reward``) is the model directory of the earlier stage NAME: SFT -> reward model -> PPO.
* ``--set KEY=VALUE`` sets a shared key; ``--set stages.N.KEY=VALUE`` sets stage N's own key.
* Before anything runs, every stage's config and data rows are checked, and every stage's output
  directory: a finished stage (``summary.json`` and ``model/``) is skipped if its saved config is the one
  it would run now; an unfinished one that holds files needs ``--resume``. Errors name the stage.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain import determinism
from posttrain.algorithms import ALGORITHMS, hyperparameter_owners
from posttrain.config import ConfigError, TrainConfig, apply_overrides, check_rewards, from_dict, section
from posttrain.config.loader import read_raw, read_yaml
from posttrain.data.formats import DataError
from posttrain.data.kinds import load_examples
from posttrain.fields import nearest
from posttrain.training.stopping import Stopped, agreed

if TYPE_CHECKING:
    from posttrain.training.offline import RunResult

# Keys of the top level that are the pipeline's own, not defaults shared by the stages.
PIPELINE_KEYS = ("stages", "model", "output_dir")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class PipelineError(RuntimeError):
    """A stage failed while running; the message (one line) names it, the original is the ``__cause__``."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        first = (str(cause).strip().splitlines() or [""])[0]
        super().__init__(
            f"stage {stage!r} failed: {type(cause).__name__}: {first} (earlier stages' outputs are kept and a "
            "rerun skips them; add --resume to continue this stage from its last checkpoint)"
        )
        self.stage = stage


@dataclass(frozen=True)
class Stage:
    """One validated stage: its position, name and complete run config."""

    index: int
    name: str
    config: TrainConfig
    chained: bool
    """The stage starts from the previous stage's model (it gave no ``model`` of its own)."""
    done: bool = False
    """Finished by an earlier invocation with the same config: skipped."""

    @property
    def label(self) -> str:
        return f"stages[{self.index}] ({self.name})"

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    def finished(self) -> bool:
        from posttrain.training.offline import RunResult

        return RunResult.finished(self.output_dir)

    def result(self) -> RunResult:
        """The result of a finished stage, read back from its output directory."""
        from posttrain.training.offline import RunResult

        result = RunResult.read_back(self.output_dir)
        assert result is not None, f"{self.output_dir}: not finished"
        return result


# ------------------------------------------------------------------------------------------ reading


def is_pipeline(source: object) -> typing.TypeGuard[str | Path | dict[str, Any]]:
    """Whether ``source`` (a path, a dict or a config) is a pipeline: a mapping with a ``stages`` key.

    A path that cannot be read is not a pipeline; :func:`posttrain.config.load` reports it."""
    if isinstance(source, dict):
        return "stages" in source
    if not isinstance(source, (str, Path)):
        return False
    try:
        return "stages" in read_raw(source)
    except ConfigError:
        return False


def _split_overrides(overrides: Sequence[str], n_stages: int) -> tuple[list[str], dict[int, list[str]]]:
    """``KEY=VALUE`` items for the shared top level, and ``stages.N.KEY=VALUE`` items by stage."""
    shared: list[str] = []
    by_stage: dict[int, list[str]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if parts[0] != "stages" or len(parts) == 1:
            shared.append(item)
            continue
        if not sep or len(parts) < 3 or not parts[1].isdigit() or int(parts[1]) >= n_stages:
            raise ConfigError(
                f"--set {item!r}: expected stages.N.KEY=VALUE with N a stage index from 0 to {n_stages - 1}"
            )
        by_stage.setdefault(int(parts[1]), []).append(f"{'.'.join(parts[2:])}={value}")
    return shared, by_stage


def _stage_raw(shared: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """The stage's flat config: shared defaults under its own keys, sections merged key by key, shared
    method hyperparameters kept only when the stage's method takes them."""
    method = own.get("method", shared.get("method"))
    algorithm = ALGORITHMS.get(method) if isinstance(method, str) else None
    takes = {f.name for f in dataclasses.fields(algorithm)} if algorithm else set()
    owners = hyperparameter_owners()
    out = {k: copy.deepcopy(v) for k, v in shared.items() if k not in owners or k in takes}
    for key, value in own.items():
        if key == "name":
            continue
        base, value = section(key, out.get(key)), section(key, value)
        out[key] = {**base, **value} if isinstance(base, dict) and isinstance(value, dict) else copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------------------- validation


def stages_of(source: str | Path | dict[str, Any], overrides: Sequence[str] = ()) -> list[Stage]:
    """Every stage's complete, validated config; the first bad one raises ConfigError naming it."""
    raw = read_raw(source)
    where = f"{source}: " if isinstance(source, (str, Path)) else ""
    try:
        return _stages(raw, overrides, (Path(source).parent,) if isinstance(source, (str, Path)) else ())
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from err


def _stages(raw: dict[str, Any], overrides: Sequence[str], folders: Sequence[Path] = ()) -> list[Stage]:
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError("stages: expected a non-empty list of stages (each a mapping with at least `method`)")
    shared_overrides, stage_overrides = _split_overrides(overrides, len(stages_raw))
    raw = apply_overrides(raw, shared_overrides)
    stages_raw = raw["stages"]
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError("stages: expected a non-empty list of stages")

    # Shared keys: each must be a run key or some method's hyperparameter (typos are caught here, once).
    owners = hyperparameter_owners()
    run_keys = {f.name for f in dataclasses.fields(TrainConfig) if f.name != "algorithm"} | {"method"}
    shared = {k: v for k, v in raw.items() if k not in PIPELINE_KEYS}
    for key in shared:
        if key not in run_keys and key not in owners:
            raise ConfigError(f"{key}: unknown key{nearest(key, run_keys | set(owners) | set(PIPELINE_KEYS))}")
    root = raw.get("output_dir")
    if not isinstance(root, str) or not root:
        raise ConfigError("output_dir: is required (the pipeline's root: stage NAME writes to output_dir/NAME)")

    stages: list[Stage] = []
    methods: set[str] = set()
    for i, own in enumerate(stages_raw):
        if not isinstance(own, dict):
            raise ConfigError(f"stages[{i}]: expected a mapping with at least `method`, got {own!r}")
        own = apply_overrides(own, stage_overrides.get(i, ()))
        method = own.get("method", shared.get("method"))
        name = own.get("name", f"{i}-{method}" if isinstance(method, str) else None)
        label = f"stages[{i}] ({name})" if name is not None else f"stages[{i}]"
        if name is None:  # no method, no name: the method is what is missing
            raise ConfigError(f"{label}: method: is required; one of {', '.join(ALGORITHMS)}")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ConfigError(f"{label}: name: expected letters, digits, '.', '_' or '-' (a folder name), got {name!r}")
        if any(s.name == name for s in stages):
            raise ConfigError(f"{label}: name: {name!r} is already the name of an earlier stage")
        if "output_dir" in own:
            raise ConfigError(f"{label}: output_dir: set by the pipeline (top-level output_dir / name), not per stage")
        merged = _stage_raw(shared, own)
        chained = i > 0 and "model" not in own
        if i == 0 and "model" not in own and "model" in raw:
            merged["model"] = raw["model"]
        elif chained:
            merged["model"] = str(stages[-1].output_dir / "model")
        merged["output_dir"] = str(Path(root) / name)
        earlier = {s.name: str(s.output_dir / "model") for s in stages}
        merged = _resolve_stage_refs(merged, earlier, label)
        try:
            config = from_dict(merged)
            check_rewards(config.rewards, folders, models_to_come=set(earlier.values()))
        except ConfigError as err:
            raise ConfigError(f"{label}: {err}") from err
        lora = getattr(stages[-1].config, "lora", None) if chained else None
        if lora is not None and lora.save != "merged":
            raise ConfigError(
                f"{stages[-1].label}: lora.save: must be merged, the next stage ({name}) starts from its model"
            )
        methods.add(config.method)
        stages.append(Stage(i, name, config, chained))

    unused = [k for k in shared if k in owners and k not in run_keys and not set(owners[k]) & methods]
    if unused:
        key = unused[0]
        raise ConfigError(f"{key}: no stage's method takes it (used by {', '.join(owners[key])})")
    return stages


def _resolve_stage_refs(value: Any, models: dict[str, str], label: str) -> Any:
    """Every string ``stage:NAME`` in a stage's config (``model``, ``reference.model``, ``critic_model``, a
    reward's ``path`` ...) becomes the model directory of the earlier stage NAME.

    >>> _resolve_stage_refs({"model": "stage:sft", "rewards": [{"path": "stage:rm"}]}, {"sft": "r/sft/model",
    ...                     "rm": "r/rm/model"}, "stages[2]")
    {'model': 'r/sft/model', 'rewards': [{'path': 'r/rm/model'}]}
    """
    if isinstance(value, dict):
        return {k: _resolve_stage_refs(v, models, label) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_stage_refs(v, models, label) for v in value]
    if isinstance(value, str) and value.startswith("stage:"):
        name = value[len("stage:") :]
        if name not in models:
            known = ", ".join(models) or "none"
            raise ConfigError(f"{label}: {value!r}: no earlier stage is named {name!r} (earlier stages: {known})")
        return models[name]
    return value


def _saved_differences(stage: Stage) -> list[str]:
    """Keys whose saved value (``config.yaml`` of a finished run) differs from the stage's config now, less
    those that do not change what is trained (how often to log or save, ``distributed``: a stage finished by
    one process is the stage N processes would train)."""
    from posttrain.training.offline import RESUME_MAY_CHANGE
    from posttrain.training.rundir import config_changes

    path = stage.output_dir / "config.yaml"
    if not path.is_file():
        return []
    try:
        saved = from_dict(read_yaml(path)).to_dict()
    except (ConfigError, TypeError, AttributeError):
        return ["config.yaml (unreadable)"]
    return config_changes(saved, stage.config.to_dict(), RESUME_MAY_CHANGE)  # (a moved pipeline: no change)


def _refers_to(stage: Stage, earlier: Stage) -> bool:
    """Whether ``stage``'s config names ``earlier``'s model (``stage:NAME`` resolved: a reward model ...)."""
    import json

    return str(earlier.output_dir / "model") in json.dumps(stage.config.to_dict(), default=str)


def _check_outputs(stages: list[Stage], resume: bool, idle: Collection[str] = ()) -> list[Stage]:
    """Mark the finished stages as done; refuse output directories that a run would clash with (a stage that
    posttrain marked as failed or killed before its first checkpoint starts again in place). ``idle``: the
    names of stages not run now (a frontier's ``--only``), whose unfinished folders clash with nothing."""
    from posttrain.training.rundir import restartable

    out: list[Stage] = []
    for stage in stages:
        has_files = stage.output_dir.is_dir() and any(stage.output_dir.iterdir())
        if stage.finished():
            # Only a stage built on an unfinished earlier one is stale (a grid's independent runs are not).
            pending = [s.name for s in out if not s.done and (stage.chained or _refers_to(stage, s))]
            if pending:
                raise ConfigError(
                    f"{stage.label}: {stage.output_dir} holds a finished run, but the earlier stage {pending[0]!r} "
                    "has not finished and would change what it was trained from; remove that folder to rerun it"
                )
            changed = _saved_differences(stage)
            if changed:
                raise ConfigError(
                    f"{stage.label}: {stage.output_dir} holds a finished run with another config "
                    f"({'; '.join(changed[:3])}); remove that folder to train the stage again, or rename the stage"
                )
            stage = Stage(stage.index, stage.name, stage.config, stage.chained, done=True)
        elif has_files and not resume and stage.name not in idle and not restartable(stage.output_dir):
            raise ConfigError(
                f"{stage.label}: output_dir: {stage.output_dir} holds an unfinished run; pass --resume to "
                "continue it from its last checkpoint, or remove it"
            )
        out.append(stage)
    return out


def _check_data(stages: list[Stage]) -> None:
    """Read and validate every row that a stage still to run will train or evaluate on (no tokenizer)."""
    read: dict[tuple[str, str, str], Sequence[Any]] = {}
    for stage in stages:
        if stage.done:
            continue
        algorithm = stage.config.algorithm
        data = stage.config.data
        for source in filter(None, (data.train, data.eval)):
            key = (algorithm.data_kind, source, data.split)
            try:
                if key not in read:
                    read[key] = load_examples(*key)
                algorithm.check_examples(read[key], source)
            except DataError as err:
                raise DataError(f"{stage.label}: {err}") from err


def validate(
    source: str | Path | dict[str, Any], overrides: Sequence[str] = (), resume: bool = False, check_data: bool = True,
    idle: Collection[str] = (),
) -> list[Stage]:  # fmt: skip
    """Everything checked before a pipeline runs: every stage's config, output directory and data rows.

    ``idle``: stages not run now (a frontier's ``--only``): an unfinished folder of theirs is not refused.
    Returns the stages, the finished ones marked ``done``. Raises ConfigError or DataError naming the stage.
    """
    stages = stages_of(source, overrides)
    try:
        stages = _check_outputs(stages, resume, idle)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}" if isinstance(source, (str, Path)) else str(err)) from err
    if check_data:
        _check_data(stages)
    return stages


# --------------------------------------------------------------------------------------------- running


def run_pipeline(
    source: str | Path | dict[str, Any],
    overrides: Sequence[str] = (),
    resume: bool = False,
    on_stage: Callable[[Stage, RunResult], None] | None = None,
) -> list[RunResult]:
    """Validate every stage, then run them in order (skipping finished ones); one result per stage.

    ``on_stage(stage, result)`` is called after each stage, run or skipped (the CLI prints with it). The
    pipeline's root folder is locked for the whole run: one lock covers every stage's folder."""
    from posttrain.training import rundir

    root = stages_of(source, overrides)[0].output_dir.parent  # (a bad config: one line, nothing written)
    with rundir.locked(root):
        return _run_stages(source, overrides, resume, on_stage)


def _run_stages(
    source: str | Path | dict[str, Any],
    overrides: Sequence[str],
    resume: bool,
    on_stage: Callable[[Stage, RunResult], None] | None,
) -> list[RunResult]:
    from tqdm import tqdm

    from posttrain.training.dispatch import run

    stages = validate(source, overrides, resume)
    # Each stage's run sets its own determinism switches; a deterministic stage needs cuBLAS's setting before
    # an earlier stage starts CUDA, so it is made (or refused) here, first.
    deterministic = [s for s in stages if not s.done and s.config.deterministic]
    if deterministic:
        try:
            determinism.configure(True)
        except ConfigError as err:
            raise ConfigError(f"{deterministic[0].label}: {err}") from err
    results: list[RunResult] = []
    for stage in stages:
        if stage.done:
            tqdm.write(f"stage {stage.name}: done, skipped")
            result = stage.result()
        else:
            if agreed():  # SIGTERM between stages (a frontier measuring the last one's points, say)
                raise Stopped(f"stopped by {Stopped.signal()} before stage {stage.name}; --resume starts it")
            tqdm.write(f"stage {stage.name}: {stage.config.method} from {stage.config.model} -> {stage.output_dir}")
            try:
                result = run(stage.config, resume=resume)
            except ConfigError as err:
                raise ConfigError(f"{stage.label}: {err}") from err
            except DataError as err:
                raise DataError(f"{stage.label}: {err}") from err
            except Stopped:  # SIGTERM: the stage saved its checkpoint; --resume continues it
                raise
            except Exception as err:
                raise PipelineError(stage.name, err) from err
        if on_stage is not None:
            on_stage(stage, result)
        results.append(result)
    return results
