"""Weights stored once: the final model and the checkpoint of the same step share one file (a hard link), and
replacing either name leaves the other's bytes as they were (posttrain renames new folders into place)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support import first_bundled_pairs, run_config

import posttrain
from posttrain.training import checkpoint


def weights(folder: Path) -> Path:
    return folder / "model.safetensors"


def test_share_weights_links_equal_files_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal bytes become one file; a file that differs, one with no counterpart and one that is not weights
    stay as written; where the file system cannot link, both copies stay."""
    same, new = tmp_path / "model", tmp_path / "checkpoint"
    for folder in (same, new):
        folder.mkdir()
        save_file({"w": torch.ones(4)}, str(folder / "a.safetensors"))
        (folder / "tokenizer.json").write_text("{}")
    save_file({"w": torch.zeros(4)}, str(same / "b.safetensors"))
    save_file({"w": torch.ones(4)}, str(new / "b.safetensors"))  # same size, other bytes
    save_file({"w": torch.ones(4)}, str(new / "c.safetensors"))  # nothing to share with

    monkeypatch.setattr(os, "link", lambda *_: (_ for _ in ()).throw(OSError(18, "Invalid cross-device link")))
    assert checkpoint.share_weights(new, same) == 0
    assert not (new / "a.safetensors").samefile(same / "a.safetensors")
    monkeypatch.undo()

    assert checkpoint.share_weights(new, same) == (new / "a.safetensors").stat().st_size
    assert (new / "a.safetensors").samefile(same / "a.safetensors")
    assert not (new / "b.safetensors").samefile(same / "b.safetensors")
    assert not (new / "tokenizer.json").samefile(same / "tokenizer.json")
    assert (new / "c.safetensors").stat().st_nlink == 1
    assert sorted(p.name for p in new.iterdir()) == [f"{n}.safetensors" for n in "abc"] + ["tokenizer.json"]
    assert checkpoint.share_weights(new, None) == 0


def test_link_or_copy_links_weights_and_copies_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model card (README.md, written after the copy) never shares its file; weights do, or are copied where
    the folder cannot link."""
    (tmp_path / "m.safetensors").write_bytes(b"weights")
    (tmp_path / "README.md").write_text("card")
    checkpoint.link_or_copy(tmp_path / "m.safetensors", tmp_path / "linked.safetensors")
    checkpoint.link_or_copy(tmp_path / "README.md", tmp_path / "copy.md")
    assert (tmp_path / "linked.safetensors").samefile(tmp_path / "m.safetensors")
    assert (tmp_path / "copy.md").read_text() == "card" and (tmp_path / "copy.md").stat().st_nlink == 1
    monkeypatch.setattr(os, "link", lambda *_: (_ for _ in ()).throw(PermissionError(1, "Operation not permitted")))
    checkpoint.link_or_copy(tmp_path / "m.safetensors", tmp_path / "copied.safetensors")
    assert (tmp_path / "copied.safetensors").read_bytes() == b"weights"
    assert (tmp_path / "copied.safetensors").stat().st_nlink == 1


def test_the_final_model_and_the_last_checkpoint_are_stored_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An offline run saving every 2 of 6 steps: ``model/`` and ``checkpoints/step-000006`` share their weights
    (steps 2 and 4 are other weights); the checkpoint stays whole and resumable, and a new final model written
    over ``model/`` leaves the checkpoint's bytes as they were."""
    pairs = first_bundled_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    posttrain.train(run_config("dpo", tiny_model_dir, pairs, out, max_steps=6, save_steps=2, micro_batch_size=4))
    last = out / "checkpoints" / "step-000006"
    assert weights(out / "model").samefile(weights(last))
    assert not weights(out / "checkpoints" / "step-000004").samefile(weights(last))
    assert checkpoint.latest_checkpoint(out) == last and checkpoint.damage(last) is None

    before = weights(last).read_bytes()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    checkpoint.save_model(model, AutoTokenizer.from_pretrained(tiny_model_dir), out / "model")
    assert weights(last).read_bytes() == before != weights(out / "model").read_bytes()
    assert weights(last).stat().st_nlink == 1
