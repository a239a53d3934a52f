"""The model card: ``model/README.md`` in the Hugging Face convention, so the folder uploads to a hub as it is.

YAML front matter (``library_name``, ``base_model`` where the starting model is a hub id, ``tags``,
``license`` where known, ``datasets`` where the data are a hub data set), then the method, its paper and
hyperparameters, the held-out figures before and after, and how to load the model. Written once per run,
where the final model is saved (:func:`write_card`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import yaml

from posttrain.config import TrainConfig

EMBEDDED_HUB_IDS = {"embedded:smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
"""The hub repository and license of each embedded model (posttrain/model/embedded.py)."""

PAPERS = {
    "sft": ("supervised fine-tuning", ""),
    "reward": ("a Bradley-Terry reward model", "Ouyang et al. 2022, arXiv:2203.02155"),
    "dpo": ("Direct Preference Optimization (DPO)", "Rafailov et al. 2023, arXiv:2305.18290"),
    "ipo": ("Identity Preference Optimization (IPO)", "Azar et al. 2023, arXiv:2310.12036"),
    "cdpo": ("conservative DPO", "Mitchell 2023, https://ericmitchell.ai/cdpo.pdf"),
    "robust_dpo": ("robust DPO", "Chowdhury et al. 2024, arXiv:2403.00409"),
    "hinge": ("the hinge loss of RSO", "Liu et al. 2023, arXiv:2309.06657"),
    "simpo": ("Simple Preference Optimization (SimPO)", "Meng et al. 2024, arXiv:2405.14734"),
    "orpo": ("Odds Ratio Preference Optimization (ORPO)", "Hong et al. 2024, arXiv:2403.07691"),
    "distill": ("reward distillation onto each pair's reward margin", "Fisch et al. 2024, arXiv:2405.19316"),
    "kto": ("Kahneman-Tversky Optimization (KTO)", "Ethayarajh et al. 2024, arXiv:2402.01306"),
    "grpo": ("Group Relative Policy Optimization (GRPO)", "Shao et al. 2024, arXiv:2402.03300"),
    "dr_grpo": ("Dr. GRPO", "Liu et al. 2025, arXiv:2503.20783"),
    "dapo": ("DAPO", "Yu et al. 2025, arXiv:2503.14476"),
    "rloo": ("REINFORCE Leave-One-Out (RLOO)", "Ahmadian et al. 2024, arXiv:2402.14740"),
    "ppo": ("PPO with a learned critic (RLHF)", "Schulman et al. 2017, arXiv:1707.06347; Ouyang et al. 2022"),
    "iterative_dpo": ("iterative DPO on the model's own samples", "Guo et al. 2024, arXiv:2402.04792"),
}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _front_matter(path: Path) -> dict[str, Any]:
    """The YAML front matter of a README.md ({} without one)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---\n") or "\n---" not in text[4:]:
        return {}
    try:
        meta = yaml.safe_load(text[4 : text.index("\n---", 4)])
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def hub_id(name: str | None) -> str | None:
    """``name`` as a hub id: an embedded model's repository, a name that is no local path; else None.

    >>> hub_id("embedded:smollm2-135m-instruct"), hub_id("Qwen/Qwen2.5-0.5B"), hub_id("/no/such/folder")
    ('HuggingFaceTB/SmolLM2-135M-Instruct', 'Qwen/Qwen2.5-0.5B', None)
    """
    if not name:
        return None
    if name in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[name][0]
    if name.startswith(("/", ".", "~")) or Path(name).exists() or not HUB_ID.fullmatch(name):
        return None
    return name


def metadata(config: TrainConfig) -> dict[str, Any]:
    """The card's front matter. A starting model saved by posttrain (a pipeline's earlier stage) passes its
    own card's base model and license on."""
    lora = config.lora
    meta: dict[str, Any] = {"library_name": "peft" if lora is not None and lora.save == "adapter" else "transformers"}
    base, license_ = hub_id(config.model), EMBEDDED_HUB_IDS.get(config.model, (None, None))[1]
    if base is None and Path(config.model).is_dir():
        earlier = _front_matter(Path(config.model) / "README.md")
        base, license_ = earlier.get("base_model"), earlier.get("license")
    if base:
        meta["base_model"] = base
    if license_:
        meta["license"] = license_
    datasets = [d for d in dict.fromkeys((config.data.train, config.data.eval)) if hub_id(d) and "/" in str(d)]
    if datasets:
        meta["datasets"] = datasets
    tags = ["posttrain", config.method] + (["lora"] if lora is not None else [])
    meta["tags"] = tags
    meta["pipeline_tag"] = "text-classification" if config.method == "reward" else "text-generation"
    return meta


def hyperparameters(config: TrainConfig, summary: dict[str, Any]) -> list[tuple[str, Any]]:
    """The method's own hyperparameters, then the run's: what reproduces it."""
    rows: list[tuple[str, Any]] = [(f.name, getattr(config.algorithm, f.name)) for f in
                                   dataclasses.fields(config.algorithm)]  # fmt: skip
    rows += [("learning_rate", config.lr), ("lr_scheduler", config.lr_scheduler),
             ("warmup_ratio", config.warmup_ratio), ("batch_size", config.batch_size),
             ("optimizer steps", summary.get("steps")), ("max_length", config.data.max_length),
             ("precision", config.precision), ("seed", config.seed)]  # fmt: skip
    if config.algorithm.needs_reference:
        rows.append(("reference", config.reference.kind))
    if config.lora is not None:
        rows += [("lora.r", config.lora.r), ("lora.alpha", config.lora.alpha), ("lora.save", config.lora.save)]
        rows += [("lora.load_in_4bit", True)] if config.lora.load_in_4bit else []
    if config.rewards:
        rows.append(("rewards", json.dumps(list(config.rewards))))
    return [(k, v) for k, v in rows if v is not None]


def _value(v: Any) -> str:
    text = f"{v:.4g}" if isinstance(v, float) else str(v)
    return text.replace("|", "\\|")


def card(config: TrainConfig, summary: dict[str, Any], model_name: str) -> str:
    """The README.md text."""
    meta = metadata(config)
    name, paper = PAPERS.get(config.method, (config.method, ""))
    start = f"[{meta['base_model']}](https://huggingface.co/{meta['base_model']})" if "base_model" in meta else (
        f"`{config.model}`")  # fmt: skip
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {model_name}", ""]
    data = [f"{split} `{d if hub_id(d) and '/' in d else Path(d).name}`"
            for split, d in (("train", config.data.train), ("held out", config.data.eval)) if d]  # fmt: skip
    lines += [f"Trained by posttrain from {start}.", "", f"- method: {name}, `method: {config.method}`"]
    lines += [f"- paper: {paper}"] if paper else []
    lines += [f"- data: {', '.join(data)}", "", "## Training", "", "| hyperparameter | value |", "|---|---|"]
    lines += [f"| {k} | {_value(v)} |" for k, v in hyperparameters(config, summary)]
    before, after = summary.get("heldout_before") or {}, summary.get("heldout_after") or {}
    if after:
        lines += ["", "## Evaluation", "", "On held-out data, before and after training:", ""]
        lines += ["| figure | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {_value(before[k]) if k in before else '-'} | {_value(v)} |" for k, v in after.items()
                  if isinstance(v, (int, float))]  # fmt: skip
    if meta["library_name"] == "peft":
        imports, loader = ["from peft import AutoPeftModelForCausalLM"], "AutoPeftModelForCausalLM"
    else:
        loader = "AutoModelForSequenceClassification" if config.method == "reward" else "AutoModelForCausalLM"
        imports = []
    code = [*imports, f"from transformers import {loader + ', ' if not imports else ''}AutoTokenizer", "",
            f'path = "{Path(config.output_dir) / "model"}"  # or the hub id of this folder once uploaded',
            f"model = {loader}.from_pretrained(path)", "tokenizer = AutoTokenizer.from_pretrained(path)"]  # fmt: skip
    lines += ["", "## Use", "", "```python", *code, "```", ""]
    return "\n".join(lines)


def write_card(model_dir: Path, config: TrainConfig, summary: dict[str, Any]) -> Path:
    """Write ``model_dir/README.md`` (atomically: a temporary file renamed); returns its path."""
    target = Path(model_dir) / "README.md"
    tmp = target.with_name(".README.md.tmp")
    tmp.write_text(card(config, summary, Path(config.output_dir).name), encoding="utf-8")
    tmp.replace(target)
    return target
