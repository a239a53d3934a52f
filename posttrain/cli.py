"""The command line.

    posttrain train CONFIG.yaml [--set KEY=VALUE ...] [--resume]     (a config with `stages:` is a pipeline)
    posttrain data validate FILE [--method dpo]
    posttrain recommend FILE [--split train]
    posttrain report RUN_DIR [RUN_DIR ...] [-o FILE]                (an HTML page: curves, eval, samples, config)
    posttrain eval RUN_DIR_OR_CONFIG [--model PATH] [--data FILE] [--samples N] [--temperature T]
    posttrain frontier CONFIG.yaml [--set KEY=VALUE ...] [--resume] [--quick] [--only LABEL]   (reward vs KL)

Bad input (config or data) prints one line ``posttrain: error: ...`` naming the file, row and field, and
exits with status 2 before anything is written. A pipeline stage that fails while running prints one line
naming the stage and exits with status 1, as does a reward that fails or returns a bad value at a rollout
(the line names the reward and the first bad value). A run stopped by SIGTERM (a scheduler's time limit, a
reclaimed instance) writes a checkpoint at the next optimizer step, prints one line ``posttrain: stopped by
SIGTERM after step N of M; checkpoint ...`` and exits with status 143; ``--resume`` continues it
(:mod:`posttrain.training.stopping`). Anything else is a bug: a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.config import ConfigError
from posttrain.data.formats import DataError
from posttrain.pipeline import PipelineError, Stage
from posttrain.report.runs import ReportError
from posttrain.rewards.combine import RewardError
from posttrain.training.checkpoint import WriteError
from posttrain.training.guard import NonFiniteError
from posttrain.training.stopping import EXIT_STATUS, Stopped

if TYPE_CHECKING:
    from posttrain.training.offline import RunResult


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description="Post-training for causal language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", help="YAML config file")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted for sections, e.g. data.max_length=256; in a pipeline, a shared key,"
        " or stages.N.KEY for stage N only); repeatable",
    )
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")

    data = sub.add_parser("data", help="data set tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    validate = data_sub.add_parser("validate", help="check every row of a data file, no model needed")
    validate.add_argument("file")
    validate.add_argument("--method", default="dpo", help="the method whose row format to check (default dpo)")
    validate.add_argument("--split", default="train", help="split of a saved or hub data set")

    evaluate = sub.add_parser("eval", help="score a trained model against its reference on held-out data")
    evaluate.add_argument("run", help="a run directory (config.yaml + model/) or a config file")
    evaluate.add_argument("--model", help="the model to score (default: RUN/model, or the config's model)")
    evaluate.add_argument("--data", help="held-out data (default: the config's data.eval)")
    evaluate.add_argument(
        "--samples", type=int, default=4, help="online runs: completions per prompt from policy and reference"
    )
    evaluate.add_argument(
        "--temperature", type=float, help="online runs: sampling temperature (default: the run's generation one)"
    )

    report = sub.add_parser("report", help="an HTML page of one or more runs (several: curves overlaid)")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run, pipeline or iterative_dpo folder")
    report.add_argument("-o", "--output", help="the HTML file (default: RUN_DIR/report.html; several: ./report.html)")

    frontier = sub.add_parser("frontier", help="train a grid of methods x strengths, then plot reward against KL")
    frontier.add_argument("config", help="a frontier YAML config (a `grid` of runs and a `frontier` section)")
    frontier.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a shared key of the config; repeatable")  # fmt: skip
    frontier.add_argument("--resume", action="store_true", help="continue unfinished runs from their checkpoints")
    frontier.add_argument(
        "--quick", action="store_true", help="the whole frontier on a tiny model and a few prompts, in seconds"
    )
    frontier.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="LABEL",
        help="train now only this curve (a label) or run (a name); repeatable",
    )

    recommend = sub.add_parser("recommend", help="suggest methods and a starting config for a data file")
    recommend.add_argument("file")
    recommend.add_argument("--split", default="train", help="split of a saved or hub data set")
    return parser


def _validate(file: str, method: str, split: str) -> int:
    from posttrain.algorithms import ALGORITHMS
    from posttrain.data.kinds import load_examples

    if method not in ALGORITHMS:
        raise ConfigError(f"--method: unknown method {method!r}; one of {', '.join(ALGORITHMS)}")
    kind = ALGORITHMS[method].data_kind
    examples = load_examples(kind, file, split)
    ALGORITHMS[method].check_examples(examples, file)
    if kind == "prompts":
        print(f"{file}: {len(examples)} rows OK for {method} (prompts)")
        return 0
    # Every example type carries its completion(s) as text or as a conversation (a list of messages).
    answer = ("chosen", "completion")
    shapes = {"string" if isinstance(next(getattr(e, a) for a in answer if hasattr(e, a)), str) else "conversation"
              for e in examples}  # fmt: skip
    noun = "pairs" if kind in ("preference", "reward") else "examples"
    print(f"{file}: {len(examples)} rows OK for {method} ({', '.join(sorted(shapes))} {noun})")
    return 0


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The held-out before/after figures of a run, as a few printable lines."""
    before, after = summary.get("heldout_before"), summary.get("heldout_after")
    if not after:
        return []
    rows = [
        ("policy log-prob margin, chosen - rejected (nats)", "policy_margin", "{:+.3f}"),
        ("share of pairs where the policy prefers chosen", "policy_prefers_chosen", "{:.1%}"),
        (f"{summary['method']} loss", "loss", "{:.4f}"),
        (f"{summary['method']} reward accuracy", "accuracy", "{:.1%}"),
    ]
    if "reward" in after:  # online methods: greedy answers to held-out prompts, scored by the run's rewards
        rows = [("mean reward (greedy)", "reward", "{:.3f}")]
        rows += [(f"  {k[len('reward/') :]}", k, "{:.3f}") for k in after if k.startswith("reward/")]
        rows += [("completion length (tokens)", "completion_length", "{:.1f}")]
    rows = [row for row in rows if row[1] in after]  # each method reports its own figures (SFT: loss only)
    header = "held-out pairs:" if "policy_margin" in after else "held-out:"
    lines = [f"{header:<53}before      after"]
    for label, key, fmt in rows:
        was = fmt.format(before[key]) if before and key in before else "-"
        lines.append(f"  {label:<50} {was:>9}  {fmt.format(after[key]):>9}")
    return lines


def report_hint(output_dir: Path) -> str:
    """The line ``posttrain train`` ends with: how to see the run."""
    from posttrain.report import REPORT_FILE

    return f"report:  posttrain report {output_dir}   (then open {output_dir / REPORT_FILE} in a browser)"


def _print_run(result: RunResult, hint: bool = True) -> None:
    from posttrain import distributed

    if not distributed.is_main():  # under torchrun, one process speaks for the run
        return
    for line in summary_lines(result.summary):
        print(line)
    print(f"model:   {result.model_dir}")
    print(f"metrics: {result.metrics_path}")
    print(f"summary: {result.output_dir / 'summary.json'}")
    if hint:
        print(report_hint(result.output_dir))


def _train_pipeline(config: str | Path | dict[str, Any], overrides: Sequence[str], resume: bool) -> int:
    """A config with ``stages:``: every stage is checked first, then run in order (posttrain.pipeline)."""
    from posttrain.pipeline import run_pipeline

    def on_stage(stage: Stage, result: RunResult) -> None:
        print(f"== stage {stage.name} ({stage.config.method}) ==")
        _print_run(result, hint=False)

    results = run_pipeline(config, overrides=overrides, resume=resume, on_stage=on_stage)
    print(f"final model: {results[-1].model_dir}")
    print(report_hint(results[-1].output_dir.parent))  # the pipeline's root: a section per stage
    return 0


def _error(err: Exception) -> None:
    """A known error's one line on stderr: on a line of its own even while a progress bar is drawn there
    (tqdm clears the bar first), its message kept to one line."""
    from tqdm import tqdm

    tqdm.write(f"posttrain: error: {' '.join(str(err).splitlines())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            from posttrain.pipeline import is_pipeline
            from posttrain.training.dispatch import run

            if is_pipeline(args.config):
                return _train_pipeline(args.config, args.overrides, args.resume)
            _print_run(run(args.config, overrides=args.overrides, resume=args.resume))
            return 0
        if args.command == "eval":
            import json

            from posttrain.evaluate import evaluate_run

            figures = evaluate_run(args.run, args.model, args.data, args.samples, args.temperature)
            print(json.dumps(figures, indent=2))
            return 0
        if args.command == "report":
            from posttrain.report import write_report

            target = write_report(args.runs, args.output)
            print(f"report: {target}   (open it in a browser: {target.resolve().as_uri()})")
            return 0
        if args.command == "frontier":
            from posttrain.frontier import run_frontier

            run_frontier(args.config, args.overrides, args.resume, args.quick, args.only)
            return 0
        if args.command == "recommend":
            from posttrain.recommend import recommend

            print("\n".join(recommend(args.file, args.split)))
            return 0
        return _validate(args.file, args.method, args.split)
    except (ConfigError, DataError, ReportError) as err:
        _error(err)
        return 2
    except PipelineError as err:  # a stage failed while running; its cause is chained for Python callers
        _error(err)
        return 1
    except RewardError as err:  # a reward failed or returned a bad value at a rollout: the reward and the value
        _error(err)
        return 1
    except WriteError as err:  # a model or checkpoint not written after the retries (a full disk, say)
        _error(err)
        return 1
    except NonFiniteError as err:  # training diverged: the step, the figure, the likely cause; nothing saved after
        _error(err)
        return 1
    except Stopped as err:  # SIGTERM: a checkpoint at the step it came in (or the run had finished)
        from tqdm import tqdm

        tqdm.write(f"posttrain: {err}", file=sys.stderr)
        return EXIT_STATUS


if __name__ == "__main__":
    sys.exit(main())
