"""`posttrain report`: a self-contained HTML page per family of methods, drawn from tiny real runs and read
back with the standard library's HTML parser (the charts, the held-out table, the config and summary, no
script and nothing fetched); several runs overlaid; a pipeline reported stage by stage; bad folders in one
line."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import first_bundled_pairs, run_config, write_word_prompts

import posttrain
from posttrain.cli import main
from posttrain.config import load
from posttrain.report import write_report
from posttrain.report.runs import ReportError, read_sections
from posttrain.rollout.generate import ScriptedGenerator
from posttrain.training.iterative import run_iterative
from posttrain.training.online import run_online

SVG_NS = "{http://www.w3.org/2000/svg}"


class Page(HTMLParser):
    """What a report shows: section titles, chart titles and their line colours, tables, external links."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.h2: list[str] = []
        self.charts: dict[str, set[str]] = {}  # chart title -> colours of its lines
        self.tables: list[str] = []
        self.pre: dict[str, list[str]] = {"config": [], "summary": []}
        self.scripts = 0
        self.external: list[str] = []
        self._chart: str | None = None
        self._title = False
        self._pre: str | None = None
        self._h2 = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for name in ("src", "href"):
            if a.get(name) and not str(a[name]).startswith("#"):
                self.external.append(str(a[name]))
        self.scripts += tag == "script"
        if tag == "svg" and a.get("class") == "chart":
            self._chart = str(a.get("aria-label"))
            self.charts[self._chart] = set()
        if tag == "polyline" and self._chart is not None:
            self.charts[self._chart].add(str(a.get("stroke")))
        self._title = tag == "text" and a.get("class") == "title"
        if tag == "table":
            self.tables.append(str(a.get("class")))
        if tag == "pre":
            self._pre = a.get("class")
        self._h2 = tag == "h2"

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._chart = None
        if tag == "pre":
            self._pre = None
        self._h2 = self._h2 and tag != "h2"

    def handle_data(self, data: str) -> None:
        if self._pre in self.pre:
            self.pre[self._pre].append(data)
        if self._h2:
            self.h2.append(data)


def report(*folders: Path) -> tuple[Page, str]:
    target = write_report(list(folders), folders[0].parent / "report.html")
    text = target.read_text(encoding="utf-8")
    for svg in text.split('<svg class="chart"')[1:]:  # each chart is well-formed XML
        ET.fromstring('<svg class="chart"' + svg.split("</svg>")[0] + "</svg>")
    page = Page(text)
    assert page.scripts == 0 and page.external == [], "nothing is run or fetched"
    return page, text


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return first_bundled_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", 16)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    write_word_prompts(path, 8)
    return path


def online(method: str, model: Path, data: Path, out: Path, **extra: Any) -> dict[str, Any]:
    return {
        "method": method, "model": str(model), "output_dir": str(out),
        "data": {"train": str(data), "eval": str(data), "max_length": 64},
        "rewards": [{"name": "regex_format", "pattern": "^yes$", "fullmatch": True}],
        "num_generations": 2, "batch_size": 4, "max_steps": 2, "learning_rate": 1e-3,
        "warmup_ratio": 0.0, "lr_scheduler": "constant", "beta": 0.02, **extra,
    }  # fmt: skip


def scripted(model: Any, tokenizer: Any) -> ScriptedGenerator:
    return ScriptedGenerator(tokenizer, ["yes", "no", "maybe"], score_model=model)


COMMON = {"loss", "learning rate", "gradient norm", "peak memory (GiB)"}
OFFLINE = {
    "dpo": {"policy log-prob margin, chosen - rejected (nats)", "share of pairs where the policy prefers chosen",
            "reward accuracy", "rewards of chosen and rejected"},
    "kto": {"KTO rewards, desirable and undesirable", "KL to the reference"},
    "sft": {"trained tokens per example"},
    "reward": {"reward accuracy", "rewards of chosen and rejected", "reward margin, chosen - rejected"},
}  # fmt: skip
ONLINE = {
    "grpo": {"reward", "KL to the reference", "clip fractions", "completion length (tokens)",
             "entropy (nats per token)", "approximate KL to the sampling policy"},
    "rloo": {"reward", "KL to the reference", "completion length (tokens)", "entropy (nats per token)"},
    "ppo": {"reward", "value loss", "explained variance", "clip fractions", "KL to the reference"},
}  # fmt: skip


@pytest.mark.parametrize("method", sorted(OFFLINE))
def test_offline_families(method: str, tiny_model_dir: Path, pairs: Path, tmp_path: Path) -> None:
    posttrain.train(run_config(method, tiny_model_dir, pairs, tmp_path / method, max_steps=3, eval_steps=2))
    page, text = report(tmp_path / method)
    assert COMMON | OFFLINE[method] <= set(page.charts), sorted(page.charts)
    assert all(page.charts.values()), "every chart draws a line"
    assert page.tables[0] == "heldout" and "before" in text and "after" in text
    config = yaml.safe_load("".join(page.pre["config"]))
    assert config["method"] == method and json.loads("".join(page.pre["summary"]))["method"] == method
    assert "training loss" in text  # the glance line: first and last loss


@pytest.mark.parametrize("method", sorted(ONLINE))
def test_online_families(method: str, tiny_model_dir: Path, prompts: Path, tmp_path: Path) -> None:
    run_online(load(online(method, tiny_model_dir, prompts, tmp_path / method)), generator_factory=scripted)
    page, text = report(tmp_path / method)
    assert COMMON | ONLINE[method] <= set(page.charts), sorted(page.charts)
    assert "heldout" in page.tables and "held-out reward" in text


def test_iterative_dpo(tiny_model_dir: Path, prompts: Path, tmp_path: Path) -> None:
    cfg = online("iterative_dpo", tiny_model_dir, prompts, tmp_path / "it", num_generations=3, rounds=2,
                 steps_per_round=2, beta=0.1)  # fmt: skip
    for key in ("max_steps", "warmup_ratio", "lr_scheduler"):
        cfg.pop(key)
    run_iterative(load(cfg), generator_factory=scripted)
    page, text = report(tmp_path / "it")
    assert {"round: mean reward of the sampled answers", "policy log-prob margin, chosen - rejected (nats)"} <= set(
        page.charts
    )
    (section,) = read_sections([tmp_path / "it"])
    steps = [m["step"] for m in section.runs[0].metrics if m["split"] == "train"]
    assert steps == [1, 2, 3, 4], "round 2's steps follow round 1's"
    assert "completions" in page.tables and "chosen" in text  # the last round's sampled pairs


def test_pipeline_reports_each_stage(tiny_model_dir: Path, pairs: Path, tmp_path: Path) -> None:
    config = {
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "pipe"),
        "data": {"train": str(pairs), "eval": str(pairs), "max_length": 64, "max_prompt_length": 40},
        "batch_size": 8, "learning_rate": 3e-3, "warmup_ratio": 0.0, "lr_scheduler": "constant",
        "stages": [{"name": "sft", "method": "sft", "max_steps": 2}, {"method": "dpo", "max_steps": 2}],
    }  # fmt: skip
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    page, _ = report(tmp_path / "pipe")
    assert [h for h in page.h2 if h.startswith("stage")] == ["stage sft (sft)", "stage 1-dpo (dpo)"]
    assert "policy log-prob margin, chosen - rejected (nats)" in page.charts


def test_two_runs_overlay_one_colour_each(
    tiny_model_dir: Path, pairs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two betas compared: every chart holds a line of each run; `posttrain train` said how to see them."""
    for beta in ("0.1", "0.5"):
        config = run_config("dpo", tiny_model_dir, pairs, tmp_path / f"beta{beta}", max_steps=2, beta=float(beta))
        path = tmp_path / f"beta{beta}.yaml"
        path.write_text(yaml.safe_dump(config))
        assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"posttrain report {tmp_path / 'beta0.5'}" in out and "report.html" in out
    page, text = report(tmp_path / "beta0.1", tmp_path / "beta0.5")
    assert all(len(colours) == 2 for colours in page.charts.values()), page.charts
    assert "beta0.1" in text and "beta0.5" in text
    assert main(["report", str(tmp_path / "beta0.1"), "-o", str(tmp_path / "one.html")]) == 0
    assert (tmp_path / "one.html").stat().st_size > 0


def test_bad_folders_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        assert main(["report", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(folder) in err and "Traceback" not in err
    with pytest.raises(ReportError, match=r"no metrics\.jsonl"):
        write_report([tmp_path / "empty"])


def test_a_killed_runs_last_line_and_a_replayed_step(tmp_path: Path) -> None:
    """A line cut short at the end is skipped; a step written twice (a resumed copy) shows once, the last."""
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"split": "train", "step": 1, "loss": 0.7}, {"split": "train", "step": 2, "loss": 0.6},
             {"split": "train", "step": 2, "loss": 0.5}]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"split": "tr')
    (section,) = read_sections([run])
    assert section.runs[0].series("loss", "train") == [(1.0, 0.7), (2.0, 0.5)]
    page, _ = report(run)
    assert "loss" in page.charts
