"""What a run shows: the HTML report (``posttrain report``) and the model card of a saved model.

``runs.py`` reads run folders, ``figures.py`` chooses what to draw, ``svg.py`` draws, ``page.py`` lays out
the page, ``card.py`` writes ``model/README.md``. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.report.runs import ReportError, read_sections

REPORT_FILE = "report.html"
"""The report's default name, in the run folder when one folder is reported."""


def default_output(folders: list[Path]) -> Path:
    """``RUN/report.html`` for one folder; ``report.html`` in the current folder for several."""
    return Path(folders[0]) / REPORT_FILE if len(folders) == 1 else Path(REPORT_FILE)


def write_report(folders: list[str | Path], output: str | Path | None = None) -> Path:
    """Read ``folders`` (runs, pipelines, iterative DPO runs) and write their report; returns its path.

    ReportError (one line) for a folder that holds no run."""
    from posttrain.report.page import page

    paths = [Path(f) for f in folders]
    if not paths:
        raise ReportError("report: give at least one run folder")
    sections = read_sections(paths)
    target = Path(output) if output is not None else default_output(paths)
    if target.is_dir():
        raise ReportError(f"-o: {target} is a folder; give a file name (e.g. {target / REPORT_FILE})")
    html = page(sections)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(html, encoding="utf-8")
        tmp.replace(target)
    except OSError as err:
        raise ReportError(f"-o: {target}: not written ({err})") from None
    return target


__all__ = ["REPORT_FILE", "ReportError", "default_output", "write_report"]
