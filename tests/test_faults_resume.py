"""Kill and resume: SIGKILL at the first step or during a checkpoint write, then a rerun or --resume ends
bitwise equal to an uninterrupted run (on CUDA under `deterministic: true`); a damaged latest checkpoint
falls back to the one before it; --resume verifies what it resumes (data, starting model, config; a moved
folder is the same run) and never runs code from a state file. Each case: the exit status, the one-line
message and what the folder holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from faults import assert_same_run, killed, listing, one_error_line, state_of, write_config
from safetensors.torch import load_file, save_file
from support import BIT_EXACT, first_bundled_pairs, killed_after_first_checkpoint, run_config

import posttrain
from posttrain import pipeline
from posttrain.cli import main
from posttrain.training import checkpoint
from posttrain.training.rundir import config_changes


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return first_bundled_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl")


def config(model: Path, data: Path, out: Path, **extra: Any) -> dict[str, Any]:
    """Six steps, a checkpoint every two (steps 2, 4 and the end state at 6); compared bit for bit, so
    ``deterministic: true`` on a CUDA machine (support.BIT_EXACT)."""
    settings = {"max_steps": 6, "save_steps": 2, "micro_batch_size": 4, **BIT_EXACT, **extra}
    return run_config("dpo", model, data, out, **settings)


@pytest.fixture(scope="module")
def straight(tiny_model_dir: Path, pairs_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    posttrain.train(config(tiny_model_dir, pairs_file, out))
    return out


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------- kill -9


def test_killed_at_the_first_step_reruns_from_scratch(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, straight: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL inside the first step: the folder holds the run's start (its lock, its ``running`` state) and
    no checkpoint; a plain rerun takes the dead run's lock over, says so, starts again in place and ends as
    the uninterrupted run."""
    out = tmp_path / "run"
    path = write_config(tmp_path / "c.yaml", config(tiny_model_dir, pairs_file, out))
    killed("kill-step", path)
    assert listing(out) == ["config.yaml", "metrics.jsonl", "posttrain.lock", "run_state.json"]
    assert state_of(out)["state"] == "running"
    code, stdout, _ = cli(capsys, "train", str(path))
    assert code == 0
    assert "is gone; taking it over" in stdout
    assert f"output_dir: {out}: the previous run was killed before its first checkpoint; starting it again" in stdout
    assert_same_run(straight, out)
    assert state_of(out)["state"] == "finished" and "posttrain.lock" not in listing(out)


@pytest.mark.parametrize("save", [1, 2])
def test_killed_while_writing_a_checkpoint_resumes(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, straight: Path, capsys: Any, save: int
) -> None:
    """SIGKILL while the first (or second) checkpoint is written leaves its temporary folder and no complete
    checkpoint (or the first one only). A plain start is refused where a checkpoint exists; --resume removes
    the leftover, restarts from step 0 (or continues from step 2) and ends as the uninterrupted run."""
    out = tmp_path / "run"
    path = write_config(tmp_path / "c.yaml", config(tiny_model_dir, pairs_file, out))
    killed(f"kill-save-{save}", path)
    left = [p.name for p in (out / "checkpoints").iterdir()]
    step = f"{2 * save:06d}"
    assert [n for n in left if n.startswith(f".step-{step}-")] and len(left) == save
    if save == 2:
        code, _, err = cli(capsys, "train", str(path))
        assert code == 2
        assert one_error_line(err) == (
            f"output_dir: {out} already holds files (a run that was killed after saving step-000002); pass --resume "
            "to continue that run or choose another output_dir"
        )
    code, stdout, _ = cli(capsys, "train", str(path), "--resume")
    assert code == 0
    assert f"output_dir: {out}: removed 1 unfinished writes of a killed run (.step-{step}-" in stdout
    if save == 1:
        assert (
            f"output_dir: {out}: the previous run was killed before its first checkpoint; starting it again" in stdout
        )
    else:
        assert f"resumed from {out / 'checkpoints' / 'step-000002'} at step 2" in stdout
    assert_same_run(straight, out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    assert state_of(out)["state"] == "finished"


# ------------------------------------------------------------------------------------------- damaged files


def test_a_truncated_latest_checkpoint_falls_back_to_the_one_before(
    tmp_path: Path, straight: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The end state's model file cut short (a copy interrupted, a bad disk): --resume warns, continues from
    step 4 and writes the same end state again."""
    out = tmp_path / "copy"
    shutil.copytree(straight, out)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["output_dir"] = str(out)  # (a moved run: still the same run)
    path = write_config(tmp_path / "c.yaml", cfg)
    damaged = out / "checkpoints" / "step-000006" / "model.safetensors"
    size = damaged.stat().st_size
    damaged.write_bytes(damaged.read_bytes()[: size // 2])
    (out / "model" / "model.safetensors").unlink()  # so that the resumed run visibly writes it again
    code, stdout, err = cli(capsys, "train", str(path), "--resume")
    assert code == 0
    assert (
        f"posttrain: warning: checkpoint {damaged.parent} is damaged (model.safetensors: {size // 2} bytes, {size} "
        "written); using the one before it"
    ) in err
    assert f"resumed from {out / 'checkpoints' / 'step-000004'} at step 4" in stdout
    assert_same_run(straight, out)
    assert checkpoint.damage(damaged.parent) is None


def test_keep_resumable_keeps_older_checkpoints_as_models(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, straight: Path
) -> None:
    """``keep_resumable: 1``: the same run, whose steps 2 and 4 keep their model and tokenizer but not the
    training state (the frontier's points still find them, --resume does not); a damaged newest checkpoint is
    not counted, so the one before it stays resumable."""
    from posttrain.frontier.points import fingerprint, path_points

    out = tmp_path / "run"
    posttrain.train(config(tiny_model_dir, pairs_file, out, keep_resumable=1))
    assert_same_run(straight, out)
    root, full = out / "checkpoints", straight / "checkpoints"
    state = {checkpoint.STATE_FILE, checkpoint.TENSORS_FILE}
    for step in ("step-000002", "step-000004"):
        assert sorted(p.name for p in (root / step).iterdir()) == sorted(
            p.name for p in (full / step).iterdir() if p.name not in state
        )
        assert contents(root / step) == {k: v for k, v in contents(full / step).items() if k not in state}
    newest = contents(root / "step-000006")  # whole (its trainer_state.json holds this run's config)
    assert newest.pop(checkpoint.STATE_FILE) and newest == {
        k: v for k, v in contents(full / "step-000006").items() if k != checkpoint.STATE_FILE
    }
    assert [p for _, p in checkpoint.saved(out) if checkpoint.resumable(p)] == [root / "step-000006"]
    assert [p.step for p in path_points(out)] == [2, 4, 6]

    copy = tmp_path / "copy"
    shutil.copytree(straight, copy)
    newest = copy / "checkpoints" / "step-000006" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    before = fingerprint(copy / "checkpoints" / "step-000002")
    assert checkpoint.slim(copy, 1) == [copy / "checkpoints" / "step-000002"]
    assert fingerprint(copy / "checkpoints" / "step-000002") == before  # its measured frontier point is kept
    assert checkpoint.latest_checkpoint(copy, log=lambda _: None) == copy / "checkpoints" / "step-000004"


def test_a_run_without_a_resumable_checkpoint_keeps_its_slimmed_models(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, straight: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run killed after slimming (``keep_resumable: 1``) whose newest checkpoint is then damaged has no
    checkpoint to resume: a rerun, with or without --resume, refuses in one line naming the folder and leaves
    every file as it was, where it used to restart in place and delete the models (frontier points)."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    shutil.rmtree(out / "model")
    (out / "summary.json").unlink()
    (out / "run_state.json").write_text(json.dumps({**state_of(out), "state": "failed"}))
    assert checkpoint.slim(out, 1) == [out / "checkpoints" / n for n in ("step-000004", "step-000002")]
    newest = out / "checkpoints" / "step-000006" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    before = listing(out)
    path = write_config(tmp_path / "run.yaml", config(tiny_model_dir, pairs_file, out, keep_resumable=1))
    for extra in ((), ("--resume",)):
        code, stdout, err = cli(capsys, "train", str(path), *extra)
        assert code == 2 and stdout == ""
        assert one_error_line(err).startswith(f"output_dir: {out} holds a run that ")
        assert "checkpoints none of which can be resumed (step-000002, step-000004, step-000006" in err
        assert listing(out) == before


def test_slim_finishes_a_killed_slim_and_orders_steps_by_number(tmp_path: Path) -> None:
    """A kill between the state file and the tensors leaves ``trainer_state.safetensors`` behind: the next
    slim removes it. Steps are ordered by number, so step 1,000,000 is newer than step 999,999."""
    root = tmp_path / "checkpoints"
    for name in ("step-999999", "step-1000000", "step-000010"):
        (root / name).mkdir(parents=True)
        (root / name / checkpoint.STATE_FILE).write_text(json.dumps({"format": 1, "files": {}, "state": {}}))
        save_file({"t": torch.zeros(1)}, str(root / name / checkpoint.TENSORS_FILE))
    (root / "step-000010" / checkpoint.STATE_FILE).unlink()  # killed part way through an earlier slim
    assert [p.name for _, p in checkpoint.saved(tmp_path)] == ["step-000010", "step-999999", "step-1000000"]
    assert checkpoint.latest_checkpoint(tmp_path) == root / "step-1000000"
    assert checkpoint.slim(tmp_path, 1) == [root / "step-999999", root / "step-000010"]
    assert sorted(p.name for p in (root / "step-1000000").iterdir()) == sorted(
        [checkpoint.STATE_FILE, checkpoint.TENSORS_FILE]
    )
    assert [list(p.iterdir()) for p in (root / "step-999999", root / "step-000010")] == [[], []]


def test_a_damaged_checkpoint_of_an_older_posttrain_is_seen(tmp_path: Path) -> None:
    """Checkpoints written before the file list (``trainer_state.pt``): a truncated pickle or safetensors file
    is found from the zip directory and the safetensors header."""
    ckpt = tmp_path / "step-000002"
    ckpt.mkdir()
    save_file({"w": torch.ones(64)}, str(ckpt / "model.safetensors"))
    torch.save({"step": 2, "torch_rng": torch.get_rng_state()}, ckpt / "trainer_state.pt")
    assert checkpoint.damage(ckpt) is None and checkpoint.load_state(ckpt)["step"] == 2
    whole = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(whole[:-10])
    assert checkpoint.damage(ckpt) == f"model.safetensors: {len(whole) - 10} bytes, its header describes {len(whole)}"
    (ckpt / "model.safetensors").write_bytes(whole)
    (ckpt / "trainer_state.pt").write_bytes((ckpt / "trainer_state.pt").read_bytes()[:100])
    assert checkpoint.damage(ckpt) == "trainer_state.pt: truncated or not a torch.save file"
    assert checkpoint.latest_checkpoint(tmp_path, log=lambda _: None) is None


class Payload:
    """Unpickling it creates ``path``: the proof that a pickle ran code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_a_pickle_payload_in_a_state_file_never_runs(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """A ``trainer_state.pt`` planted in the checkpoint --resume picks: refused in one line (nothing ran, the
    folder as it was). Planted next to the real state (JSON + safetensors): never read; the resume works."""
    out = tmp_path / "run"
    cfg = config(tiny_model_dir, pairs_file, out, max_steps=4)
    killed_after_first_checkpoint(lambda: posttrain.train(cfg), monkeypatch)
    ckpt = out / "checkpoints" / "step-000002"
    marker = tmp_path / "payload-ran"
    real = {name: (ckpt / name).read_bytes() for name in ("trainer_state.json", "trainer_state.safetensors")}
    for name in real:
        (ckpt / name).unlink()
    torch.save({"step": 2, "optimizer": Payload(marker)}, ckpt / "trainer_state.pt")
    before = contents(out)
    path = write_config(tmp_path / "c.yaml", cfg)
    code, _, err = cli(capsys, "train", str(path), "--resume")
    assert code == 2
    assert one_error_line(err) == (
        f"--resume: {ckpt / 'trainer_state.pt'} holds objects other than tensors and plain values; it was not loaded "
        "(no code from it ran): a file posttrain did not write? resume from another checkpoint or start a new run"
    )
    assert not marker.exists() and contents(out) == before

    for name, data in real.items():  # the genuine state back, the payload left beside it
        (ckpt / name).write_bytes(data)
    code, stdout, _ = cli(capsys, "train", str(path), "--resume")
    assert code == 0 and f"resumed from {ckpt} at step 2" in stdout
    assert not marker.exists()
    torch.load(ckpt / "trainer_state.pt", weights_only=False)  # the payload was live all along
    assert marker.exists()


# ------------------------------------------------------------------------------- what a resume must match


def test_resume_refuses_edited_data(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Training rows edited in place after the checkpoint: one line naming the file, the folder untouched;
    the rows put back, the resume goes on."""
    data = tmp_path / "train.jsonl"
    shutil.copy(pairs_file, data)
    out = tmp_path / "run"
    cfg = config(tiny_model_dir, data, out, eval_file=pairs_file, max_steps=4)
    killed_after_first_checkpoint(lambda: posttrain.train(cfg), monkeypatch)
    original = data.read_text()
    rows = [json.loads(line) for line in original.splitlines()]
    rows[5]["chosen"] = rows[5]["chosen"] + " (edited)"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = contents(out)
    path = write_config(tmp_path / "c.yaml", cfg)
    code, _, err = cli(capsys, "train", str(path), "--resume")
    assert code == 2
    line = one_error_line(err)
    assert line.startswith(f"--resume: data.train ({data}) changed since the checkpoint was saved (fingerprint ")
    assert line.endswith("); resuming would continue another run: restore it, or start a new run")
    assert contents(out) == before and state_of(out)["state"] == "failed"
    data.write_text(original)
    code, stdout, _ = cli(capsys, "train", str(path), "--resume")
    assert code == 0 and "at step 2" in stdout


def test_resume_refuses_a_changed_starting_model(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "run"
    cfg = config(model, pairs_file, out, max_steps=4)
    killed_after_first_checkpoint(lambda: posttrain.train(cfg), monkeypatch)
    weights = load_file(str(model / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3  # retrained or replaced in place
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    before = contents(out)
    code, _, err = cli(capsys, "train", str(write_config(tmp_path / "c.yaml", cfg)), "--resume")
    assert code == 2
    assert one_error_line(err).startswith(
        f"--resume: the starting model ({model}) changed since the checkpoint was saved (fingerprint "
    )
    assert contents(out) == before


def test_a_moved_run_folder_resumes(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, straight: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Killed after its first checkpoint, moved (another parent, another name): --resume with the new
    output_dir continues it, and it ends as the uninterrupted run."""
    out = tmp_path / "a" / "run"
    cfg = config(tiny_model_dir, pairs_file, out)
    killed_after_first_checkpoint(lambda: posttrain.train(cfg), monkeypatch)
    moved = tmp_path / "b" / "c" / "renamed"
    moved.parent.mkdir(parents=True)
    shutil.move(out, moved)
    code, stdout, _ = cli(capsys, "train", str(write_config(tmp_path / "c.yaml", {**cfg, "output_dir": str(moved)})),
                          "--resume")  # fmt: skip
    assert code == 0 and f"resumed from {moved / 'checkpoints' / 'step-000002'} at step 2" in stdout
    assert_same_run(straight, moved)


def test_config_changes_read_a_moved_folder_as_the_same_run() -> None:
    """Paths inside the folder that saved the run (a stage's own and its pipeline's root) are not changes;
    everything else still is, a path outside the folder included."""
    saved = {"output_dir": "/x/pipe/dpo", "model": "/x/pipe/sft/model", "data": {"train": "/x/d.jsonl"}, "beta": 0.1}
    now = {"output_dir": "/y/z/pipe2/dpo", "model": "/y/z/pipe2/sft/model", "data": {"train": "/x/d.jsonl"},
           "beta": 0.1}  # fmt: skip
    assert config_changes(saved, now, frozenset()) == []
    assert config_changes(saved, {**now, "data": {"train": "/y/z/d.jsonl"}}, frozenset()) == [
        "data: {'train': '/x/d.jsonl'} -> {'train': '/y/z/d.jsonl'}"
    ]
    assert config_changes(saved, {**now, "model": "/y/z/pipe2/rm/model"}, frozenset()) == [
        "model: '/x/pipe/sft/model' -> '/y/z/pipe2/rm/model'"
    ]
    assert config_changes({"output_dir": "runs/a", "beta": 0.1}, {"output_dir": "runs/b", "beta": 0.2},
                          frozenset({"beta"})) == []  # fmt: skip


def test_a_moved_pipeline_keeps_its_finished_stages(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    """A pipeline's root moved after both stages finished: both are still done (skipped)."""
    raw = {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "a" / "pipe"),
           "data": {"train": str(pairs_file), "max_length": 64},
           "stages": [{"name": "sft", "method": "sft", "max_steps": 1}, {"method": "dpo", "max_steps": 1}]}  # fmt: skip
    for stage in pipeline.stages_of(raw):
        (stage.output_dir / "model").mkdir(parents=True)
        (stage.output_dir / "summary.json").write_text(json.dumps({"steps": 1}))
        (stage.output_dir / "config.yaml").write_text(yaml.safe_dump(stage.config.to_dict()))
    shutil.move(tmp_path / "a" / "pipe", tmp_path / "moved")
    stages = pipeline.validate({**raw, "output_dir": str(tmp_path / "moved")}, check_data=False)
    assert [s.done for s in stages] == [True, True]
    assert stages[1].config.model == str(tmp_path / "moved" / "sft" / "model")


def test_online_resume_refuses_edited_prompts(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """The online loop verifies its prompts (and the columns its rewards read) the same way."""
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Question {i}: say the word.", "answer": "yes"} for i in range(8)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"method": "grpo", "model": str(tiny_model_dir), "output_dir": str(tmp_path / "run"),
           "data": {"train": str(prompts), "max_length": 64}, "num_generations": 2, "batch_size": 4,
           "rewards": [{"name": "regex_format", "pattern": "^yes$", "fullmatch": True}], "max_steps": 2,
           "save_steps": 1, "generation": {"max_new_tokens": 4}}  # fmt: skip
    killed_after_first_checkpoint(lambda: posttrain.train(cfg), monkeypatch)
    rows[3]["answer"] = "no"  # a column the prompt does not show: the token ids are the same
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = cli(capsys, "train", str(write_config(tmp_path / "c.yaml", cfg)), "--resume")
    assert code == 2
    assert one_error_line(err).startswith(f"--resume: data.train ({prompts}) changed since the checkpoint was saved")
