"""A sweep's summary: one row per configuration, ``sweep_summary.json``, the table and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ..blockwise.report import PruneResult
from ..common.files import atomic_write, atomic_write_json
from ..config.prune import PruneConfig
from .plots import plot_sweep, save_figure

__all__ = ["PLOT_FILE", "SUMMARY_FILE", "ConfigurationRow", "SweepSummary", "configuration_row", "summary_table",
           "write_summary"]

SUMMARY_FILE = "sweep_summary.json"
PLOT_FILE = "sweep_error.png"


class ConfigurationRow(BaseModel):
    """One configuration of a sweep: what it was, whether it finished, and its headline numbers."""

    model_config = ConfigDict(frozen=True)

    method: str
    pattern: str
    sparsity: float
    output: Path
    flow_run_id: str
    status: Literal["completed", "failed"]
    error: str | None = None
    mean_rel_error: float | None = None
    seconds: float | None = None
    reused_blocks: int | None = None
    computed_blocks: int | None = None
    mlflow_run_id: str | None = None
    tracking_problem: str | None = None  # a completed configuration whose MLflow run is missing or incomplete
    perplexity: dict[str, float] = {}


class SweepSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str
    output: Path
    plot: Path
    configurations: list[ConfigurationRow]

    @property
    def failed(self) -> list[ConfigurationRow]:
        return [row for row in self.configurations if row.status != "completed"]

    @property
    def untracked(self) -> list[ConfigurationRow]:
        """Completed configurations whose tracking failed (their folders hold their records)."""
        return [row for row in self.configurations if row.tracking_problem is not None]


def configuration_row(config: PruneConfig, flow_run_id: str, outcome: PruneResult | BaseException) -> ConfigurationRow:
    """The row of a configuration that finished (its PruneResult) or failed (its exception)."""
    row: dict[str, Any] = {"method": config.solver.method, "pattern": str(config.solver.pattern),
                           "sparsity": config.solver.pattern.sparsity, "output": config.output.folder.resolve(),
                           "flow_run_id": flow_run_id}
    if isinstance(outcome, BaseException):
        return ConfigurationRow(**row, status="failed", error=f"{type(outcome).__name__}: {outcome}")
    report = outcome.report
    return ConfigurationRow(
        **row, status="completed", mean_rel_error=report.mean_rel_error, seconds=report.seconds,
        reused_blocks=len(report.reused_blocks), computed_blocks=len(report.computed_blocks),
        mlflow_run_id=outcome.run_id, tracking_problem=outcome.tracking_problem,
        perplexity=outcome.evaluation.perplexity if outcome.evaluation else {},
    )


def summary_table(rows: list[ConfigurationRow]) -> list[dict[str, Any]]:
    """The rows as a table: rounded numbers, one column per evaluated data set."""
    return [{"method": r.method, "pattern": r.pattern, "sparsity": round(r.sparsity, 4), "status": r.status,
             "mean layer error": _rounded(r.mean_rel_error),
             **{f"ppl {name}": _rounded(value) for name, value in r.perplexity.items()},
             "seconds": _rounded(r.seconds, 1), "reused blocks": "" if r.reused_blocks is None else r.reused_blocks,
             "output": str(r.output)} for r in rows]


def write_summary(model: str, rows: list[ConfigurationRow], output: Path) -> SweepSummary:
    """``sweep_summary.json`` and the plot (``sweep_error.png``) in ``output``, each written atomically."""
    output = Path(output).resolve()
    plot_rows = [row.model_dump(mode="json") for row in rows]
    plot = atomic_write(output / PLOT_FILE, lambda p: save_figure(plot_sweep(model, plot_rows), p))
    summary = SweepSummary(model=model, output=output, plot=plot, configurations=rows)
    atomic_write_json(output / SUMMARY_FILE, summary.model_dump(mode="json"))
    return summary


def _rounded(value: float | None, digits: int = 5) -> float | str:
    return "" if value is None else round(float(value), digits)
