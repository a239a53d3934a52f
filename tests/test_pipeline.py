"""Pipelines: SFT -> DPO in one config. The DPO stage starts from the SFT model and scores its reference with
it; every stage is checked before the first one trains; finished stages are skipped; a failing stage stops
the pipeline with its name and keeps what earlier stages produced."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from support import BIT_EXACT, killed_after_first_checkpoint
from transformers import AutoModelForCausalLM

import posttrain
from posttrain.cli import main, report_hint
from posttrain.config import ConfigError, load
from posttrain.data.formats import DataError
from posttrain.model.load import load_causal_lm, load_tokenizer
from posttrain.pipeline import PipelineError, Stage, is_pipeline, run_pipeline, validate
from posttrain.training.metrics import read_metrics
from posttrain.training.pairs import PairTask
from posttrain.training.reference import compute_pair_logps

BUNDLED = Path(posttrain.__file__).parent / "bundled" / "prefs_train.jsonl"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "smollm2_sft_dpo.yaml"


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(BUNDLED.read_text().splitlines(keepends=True)[:32]))
    return path


def sft_dpo(model: Path | str, data: Path, out: Path, **shared: Any) -> dict[str, Any]:
    """SFT for 3 steps, then DPO for 2: a few seconds on the tiny model."""
    config: dict[str, Any] = {
        "model": str(model), "output_dir": str(out),
        "data": {"train": str(data), "eval": str(data), "max_length": 64, "max_prompt_length": 40},
        "batch_size": 8, "learning_rate": 3e-3, "warmup_ratio": 0.0, "lr_scheduler": "constant",
        "stages": [{"name": "sft", "method": "sft", "max_steps": 3}, {"method": "dpo", "beta": 0.1, "max_steps": 2}],
    }  # fmt: skip
    config.update(shared)
    return config


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def mean_pair_logps(stage_dir: Path, model_dir: Path, data: Path) -> tuple[float, float]:
    """Mean summed log-probs of chosen and rejected over ``data``, scored directly by the model in ``model_dir``
    with the stage's own config (tokenizer, template, truncation) and its eval batches."""
    config = load(yaml.safe_load((stage_dir / "config.yaml").read_text()))
    task = PairTask(config, load_tokenizer(config.model), torch.device("cpu"))
    records, _ = task.load_records(str(data), "train")
    model = load_causal_lm(str(model_dir), trainable=False)
    tables = compute_pair_logps(task.score, model, records, task.tokenizer.pad_token_id, 8)
    chosen, rejected = tables["chosen"], tables["rejected"]
    return float(chosen.double().mean()), float(rejected.double().mean())


# ------------------------------------------------------------------------------------------- running


@pytest.mark.parametrize("reference", ["copy", "cached", "base"])
def test_dpo_stage_starts_from_the_sft_model_and_uses_it_as_reference(
    reference: str, tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    """The DPO stage's model is the SFT output; its step-0 eval reference log-probs are the SFT model's
    (copy or cached), or the base model's when ``reference.model`` names it."""
    config = sft_dpo(tiny_model_dir, pairs_file, tmp_path / "run")
    if reference == "cached":
        config["stages"][1]["reference"] = {"kind": "cached", "cache_dir": str(tmp_path / "cache")}
    if reference == "base":
        config["stages"][1]["reference"] = {"model": str(tiny_model_dir)}
    seen: list[str] = []
    sft, dpo = run_pipeline(config, on_stage=lambda stage, result: seen.append(stage.name))
    assert seen == ["sft", "1-dpo"]
    assert sft.model_dir == tmp_path / "run" / "sft" / "model" and (sft.output_dir / "summary.json").is_file()
    assert dpo.output_dir == tmp_path / "run" / "1-dpo"
    assert dpo.summary["model"] == str(sft.model_dir)
    assert sft.summary["method"] == "sft" and dpo.summary["method"] == "dpo"

    ref_dir = tiny_model_dir if reference == "base" else sft.model_dir
    other_dir = sft.model_dir if reference == "base" else tiny_model_dir
    expected = mean_pair_logps(dpo.output_dir, ref_dir, pairs_file)
    other = mean_pair_logps(dpo.output_dir, other_dir, pairs_file)
    assert abs(expected[0] - other[0]) > 0.1, "SFT did not move the log-probs: the test would not bite"
    step0 = next(m for m in read_metrics(dpo.metrics_path) if m["split"] == "eval" and m["step"] == 0)
    assert step0["ref_chosen_logps"] == pytest.approx(expected[0], rel=1e-6)
    assert step0["ref_rejected_logps"] == pytest.approx(expected[1], rel=1e-6)


def test_cli_runs_sets_one_stage_and_rerun_skips(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--set stages.1.beta=0.2`` reaches the DPO stage only; the same command again skips both stages and
    writes nothing; changing a finished stage's config is refused."""
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(sft_dpo(tiny_model_dir, pairs_file, tmp_path / "run")))
    run = tmp_path / "run"
    assert main(["train", str(path), "--set", "stages.1.beta=0.2"]) == 0
    out = capsys.readouterr().out
    assert "== stage sft (sft) ==" in out and "== stage 1-dpo (dpo) ==" in out
    assert "held-out:" in out and "held-out pairs:" in out
    assert out.rstrip().splitlines()[-2:] == [f"final model: {run / '1-dpo' / 'model'}", report_hint(run)]
    saved = [yaml.safe_load((run / name / "config.yaml").read_text()) for name in ("sft", "1-dpo")]
    assert "beta" not in saved[0] and saved[1]["beta"] == 0.2
    counts = {p: lines(p) for p in (run / "sft" / "metrics.jsonl", run / "1-dpo" / "metrics.jsonl")}

    assert main(["train", str(path), "--set", "stages.1.beta=0.2"]) == 0
    out = capsys.readouterr().out
    assert "stage sft: done, skipped" in out and "stage 1-dpo: done, skipped" in out
    assert out.rstrip().splitlines()[-2:] == [f"final model: {run / '1-dpo' / 'model'}", report_hint(run)]
    assert {p: lines(p) for p in counts} == counts

    assert main(["train", str(path)]) == 2  # beta back to 0.1: the finished DPO stage does not match
    err = capsys.readouterr().err
    assert err.startswith(f"posttrain: error: {path}: stages[1] (1-dpo): {run / '1-dpo'} holds a finished run")
    assert "beta: 0.2 -> 0.1" in err and err.count("\n") == 1
    assert {p: lines(p) for p in counts} == counts


def test_failing_stage_is_named_and_earlier_output_kept(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("reference exploded\nsecond line")

    monkeypatch.setattr(PairTask, "prepare_references", boom)
    config = sft_dpo(tiny_model_dir, pairs_file, tmp_path / "run")
    with pytest.raises(PipelineError, match=r"^stage '1-dpo' failed: RuntimeError: reference exploded \(") as info:
        posttrain.train(config)
    assert isinstance(info.value.__cause__, RuntimeError) and "\n" not in str(info.value)
    sft = tmp_path / "run" / "sft"
    assert (sft / "summary.json").is_file() and (sft / "model" / "model.safetensors").is_file()

    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["train", str(path)]) == 1  # stage sft is skipped, 1-dpo fails again
    out, err = capsys.readouterr()
    assert "stage sft: done, skipped" in out
    assert err.splitlines()[-1].startswith("posttrain: error: stage '1-dpo' failed: RuntimeError: reference exploded")

    monkeypatch.undo()  # fixed: the rerun skips SFT and trains DPO from the kept SFT model
    result = posttrain.train(config)
    assert result.output_dir == tmp_path / "run" / "1-dpo" and result.summary["model"] == str(sft / "model")


def test_resume_continues_the_unfinished_stage(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Kill the DPO stage after its step-2 checkpoint: a rerun needs --resume, which skips SFT and continues
    DPO from step 2 (reference still the SFT model) to the weights of an uninterrupted pipeline."""
    stages = [{"name": "sft", "method": "sft", "max_steps": 3}, {"method": "dpo", "max_steps": 4, "save_steps": 2}]
    straight = run_pipeline(sft_dpo(tiny_model_dir, pairs_file, tmp_path / "straight", stages=stages, **BIT_EXACT))

    config = sft_dpo(tiny_model_dir, pairs_file, tmp_path / "run", stages=stages, **BIT_EXACT)
    # (The KeyboardInterrupt comes through unwrapped: an interrupt is not a stage failure.)
    killed_after_first_checkpoint(lambda: run_pipeline(config), monkeypatch)
    with pytest.raises(ConfigError, match=r"^stages\[1\] \(1-dpo\): output_dir: .* pass --resume"):
        run_pipeline(config)
    capsys.readouterr()
    resumed = run_pipeline(config, resume=True)
    out = capsys.readouterr().out
    assert "stage sft: done, skipped" in out and "resumed from" in out and "at step 2" in out
    a = AutoModelForCausalLM.from_pretrained(straight[1].model_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed[1].model_dir).state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_config_error_at_run_time_keeps_exit_2_and_names_the_stage(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    """batch_size larger than the data is found only after tokenizing, inside the stage."""
    config = sft_dpo(tiny_model_dir, pairs_file, tmp_path / "run")
    config["stages"][1]["batch_size"] = 64
    with pytest.raises(ConfigError, match=r"^stages\[1\] \(1-dpo\): batch_size: 64 is larger than the 32 training"):
        posttrain.train(config)
    assert (tmp_path / "run" / "sft" / "summary.json").is_file()


# ---------------------------------------------------------------------------- checked before anything runs


def test_bad_key_in_stage_2_fails_before_stage_1_writes(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = sft_dpo(tiny_model_dir, pairs_file, tmp_path / "run")
    config["stages"][1]["bta"] = 0.1
    with pytest.raises(ConfigError, match=r"^stages\[1\] \(1-dpo\): bta: unknown key \(did you mean 'beta'\?\)$"):
        posttrain.train(config)
    path = tmp_path / "pipe.yaml"
    config["stages"][1] = {"name": "pref", "method": "dpo", "beta": -1}
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err == f"posttrain: error: {path}: stages[1] (pref): beta: must be > 0, got -1.0\n"
    assert not (tmp_path / "run").exists()


def test_bad_data_in_stage_2_fails_before_stage_1_writes(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    missing, bad = tmp_path / "missing.jsonl", tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    config = sft_dpo(tiny_model_dir, pairs_file, tmp_path / "run")
    config["stages"][1]["data"] = {"train": str(missing)}
    with pytest.raises(DataError, match=rf"^stages\[1\] \(1-dpo\): {missing}: file not found$"):
        posttrain.train(config)
    config["stages"][1]["data"] = {"eval": str(bad)}  # the SFT stage's reader would accept it; DPO's does not
    with pytest.raises(DataError, match=r"^stages\[1\] \(1-dpo\): .*bad.jsonl: row 1: field 'rejected': missing"):
        posttrain.train(config)
    assert not (tmp_path / "run").exists()


def stage_values(config: dict[str, Any], *overrides: str) -> list[Stage]:
    return validate(config, overrides, check_data=False)


def test_shared_keys_merge_under_each_stage(tmp_path: Path) -> None:
    config = sft_dpo("base-model", Path("d.jsonl"), tmp_path / "run", beta=0.3)
    config["stages"][1]["data"] = {"max_length": 32, "max_prompt_length": 16}
    config["stages"][1] = {"method": "simpo", "data": config["stages"][1]["data"], "reference": "none"}
    sft, simpo = stage_values(config)
    assert sft.config.data.max_length == 64 and simpo.config.data.max_length == 32
    assert simpo.config.data.train == "d.jsonl" and simpo.config.data.max_prompt_length == 16  # merged
    assert simpo.config.reference.kind == "none"
    assert sft.config.method == "sft" and simpo.config.algorithm.beta == 0.3  # type: ignore[attr-defined]
    assert sft.config.model == "base-model" and not sft.chained
    assert simpo.config.model == str(tmp_path / "run" / "sft" / "model") and simpo.chained
    assert [s.config.output_dir for s in (sft, simpo)] == [str(tmp_path / "run" / n) for n in ("sft", "1-simpo")]
    config["stages"][1]["model"] = "other"
    assert not stage_values(config)[1].chained and stage_values(config)[1].config.model == "other"


def test_set_reaches_the_shared_level_or_one_stage(tmp_path: Path) -> None:
    config = sft_dpo("m", Path("d.jsonl"), tmp_path / "run", beta=0.1)
    config["stages"] = [{"method": "dpo"}, {"method": "dpo"}]
    betas = lambda *o: [s.config.algorithm.beta for s in stage_values(config, *o)]  # type: ignore[attr-defined]  # noqa: E731
    assert betas() == [0.1, 0.1]
    assert betas("stages.1.beta=0.2") == [0.1, 0.2]
    assert betas("beta=0.3") == [0.3, 0.3]
    assert betas("beta=0.3", "stages.0.beta=0.05") == [0.05, 0.3]
    config["stages"][0]["beta"] = 0.05  # a stage's own key wins over the shared one
    assert betas("beta=0.3") == [0.05, 0.3]
    assert [s.config.data.max_length for s in stage_values(config, "stages.0.data.max_length=48")] == [48, 64]
    assert [s.name for s in stage_values(config, "stages.1.name=second")] == ["0-dpo", "second"]
    with pytest.raises(ConfigError, match=r"--set 'stages.2.beta=1': expected stages.N.KEY=VALUE .* from 0 to 1"):
        stage_values(config, "stages.2.beta=1")
    with pytest.raises(ConfigError, match=r"^stages\[1\] \(1-dpo\): beta: must be > 0"):
        stage_values(config, "stages.1.beta=0")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gamma": 1.0}, r"^gamma: no stage's method takes it \(used by simpo, ppo\)$"),
        ({"learning_rat": 1.0}, r"^learning_rat: unknown key \(did you mean 'learning_rate'\?\)$"),
        ({"output_dir": None}, r"^output_dir: is required"),
        ({"stages": []}, r"^stages: expected a non-empty list"),
        ({"stages": [{"method": "sft"}, "dpo"]}, r"^stages\[1\]: expected a mapping"),
        ({"stages": [{"method": "sft", "name": "a"}, {"method": "dpo", "name": "a"}]}, r"^stages\[1\] \(a\): name: "),
        ({"stages": [{"method": "sft", "name": "a/b"}]}, r"^stages\[0\] \(a/b\): name: expected letters"),
        ({"stages": [{"method": "sft", "output_dir": "x"}]}, r"^stages\[0\] \(0-sft\): output_dir: set by"),
        ({"stages": [{"method": "sfft"}]}, r"^stages\[0\] \(0-sfft\): method: unknown method 'sfft' \(did"),
        ({"stages": [{"max_steps": 1}]}, r"^stages\[0\]: method: is required"),
        ({"model": None}, r"^stages\[0\] \(sft\): model: "),
    ],
)  # fmt: skip
def test_pipeline_config_errors(change: dict[str, Any], message: str, tmp_path: Path) -> None:
    config = {**sft_dpo("m", Path("d.jsonl"), tmp_path / "run"), **change}
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        stage_values(config)


def _fake_finished(stage: Stage, config: dict[str, Any] | None = None) -> None:
    (stage.output_dir / "model").mkdir(parents=True)
    (stage.output_dir / "summary.json").write_text(json.dumps({"method": stage.config.method, "steps": 3}))
    (stage.output_dir / "config.yaml").write_text(yaml.safe_dump(config or stage.config.to_dict()))


def test_output_directories_are_checked_upfront(tmp_path: Path) -> None:
    config = sft_dpo("m", Path("d.jsonl"), tmp_path / "run")
    sft, dpo = stage_values(config)
    _fake_finished(dpo)  # DPO finished, but SFT (its input) has not: rerunning SFT would change it
    with pytest.raises(ConfigError, match=r"^stages\[1\] \(1-dpo\): .* but the earlier stage 'sft' has not finished"):
        stage_values(config)
    _fake_finished(sft)
    assert [s.done for s in stage_values(config)] == [True, True]
    assert stage_values(config)[0].result().steps == 3
    with pytest.raises(ConfigError, match=r"^stages\[0\] \(sft\): .* another config \(max_steps: 3 -> 4\)"):
        stage_values(config, "stages.0.max_steps=4")
    # How the stage is run (processes, strategy) or how often it logs does not change what it trained.
    rerun = stage_values(config, "stages.0.distributed.strategy=fsdp2", "stages.0.logging_steps=7")[0]
    assert rerun.done and rerun.config.distributed.strategy == "fsdp2" and rerun.config.logging_steps == 7

    (dpo.output_dir / "summary.json").unlink()  # DPO interrupted: its folder holds files
    with pytest.raises(ConfigError, match=r"^stages\[1\] \(1-dpo\): output_dir: .* unfinished run; pass --resume"):
        stage_values(config)
    assert [s.done for s in validate(config, resume=True, check_data=False)] == [True, False]


def test_is_pipeline(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"method": "sft"}]}))
    assert is_pipeline(path) and is_pipeline(str(path)) and is_pipeline({"stages": []})
    assert not is_pipeline({"method": "dpo"}) and not is_pipeline(tmp_path / "missing.yaml")


def test_example_validates(tmp_path: Path) -> None:
    """The SmolLM2 SFT -> DPO example: its configs and bundled data check out (it is not run here)."""
    sft, dpo = validate(EXAMPLE, [f"output_dir={tmp_path / 'run'}"])
    assert (sft.name, sft.config.method, sft.config.model) == ("sft", "sft", "embedded:smollm2-135m-instruct")
    assert (sft.config.max_steps, sft.config.batch_size, sft.config.lr) == (20, 8, 1e-5)
    assert sft.config.data.max_length == 128 and sft.config.data.eval == "bundled:prefs_heldout.jsonl"
    assert (dpo.name, dpo.config.method, dpo.config.max_steps, dpo.config.batch_size) == ("dpo", "dpo", 40, 8)
    assert dpo.config.algorithm.beta == 0.1 and dpo.config.lr == 5e-6  # type: ignore[attr-defined]
    assert dpo.config.reference.kind == "cached" and dpo.config.reference.model is None
    assert dpo.chained and dpo.config.model == str(tmp_path / "run" / "sft" / "model")
    assert dpo.config.data.train == sft.config.data.train == "bundled:prefs_train.jsonl"


def test_sft_reward_ppo_pipeline_on_the_tiny_model(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    """The three RLHF stages in one config: PPO starts from the SFT model (`stage:sft`), is rewarded by the
    reward stage's model, and its critic starts from that reward model; every output reloads."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.model.value import critic_source

    config = sft_dpo(tiny_model_dir, pairs_file, tmp_path / "rlhf")
    config["stages"] = [
        {"name": "sft", "method": "sft", "max_steps": 2},
        {"name": "rm", "method": "reward", "max_steps": 2},
        {"name": "ppo", "method": "ppo", "model": "stage:sft", "max_steps": 2, "batch_size": 4, "ppo_epochs": 2,
         "rewards": [{"name": "reward_model", "path": "stage:rm", "max_length": 64}],
         "generation": {"max_new_tokens": 4}, "num_generations": 2},
    ]  # fmt: skip
    sft, rm, ppo = run_pipeline(config)
    ppo_config = load(ppo.output_dir / "config.yaml")
    assert ppo_config.model == str(sft.model_dir)
    assert critic_source(None, ppo_config.rewards, ppo_config.model) == str(rm.model_dir)
    steps = [m for m in read_metrics(ppo.metrics_path) if m["split"] == "train"]
    assert len(steps) == 2 and all("value_loss" in m and "kl_ref" in m for m in steps)
    assert "reward" in ppo.summary["heldout_before"] and "reward" in ppo.summary["heldout_after"]
    AutoModelForCausalLM.from_pretrained(ppo.model_dir)
    assert AutoModelForSequenceClassification.from_pretrained(ppo.output_dir / "critic").config.num_labels == 1


def test_stage_references_must_name_an_earlier_stage(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    config = sft_dpo(tiny_model_dir, pairs_file, tmp_path / "x")
    config["stages"][1]["model"] = "stage:later"
    with pytest.raises(ConfigError, match=r"stages\[1\] \(1-dpo\): 'stage:later': no earlier stage is named 'later'"):
        validate(config)


def test_rlhf_example_validates(tmp_path: Path) -> None:
    sft, rm, ppo = validate(EXAMPLE.parent / "smollm2_rlhf.yaml", [f"output_dir={tmp_path / 'run'}"])
    assert (sft.config.method, rm.config.method, ppo.config.method) == ("sft", "reward", "ppo")
    assert ppo.config.model == str(tmp_path / "run" / "sft" / "model")
    assert ppo.config.rewards[0]["path"] == str(tmp_path / "run" / "reward" / "model")
