"""Parallel layer solves: the independent layer problems of a block through a Prefect task runner.

Each layer problem (W, H and the input statistics) is written to a safetensors file; a ``solve-layer``
task loads it on its worker's device, solves it and writes the pruned weight to another file, returning
only its small report. So the same code runs on a thread pool (default), on Dask (``prefect-dask``, a
local cluster or an existing one by address) or on Ray (``prefect-ray``, optional extra), and no tensor
is ever pickled into a task parameter or result. Solves are deterministic, so the pruned weights are
identical to a sequential run whatever the runner and worker count.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from prefect import task
from prefect.task_runners import ThreadPoolTaskRunner
from safetensors import safe_open
from safetensors.torch import save_file

from alps_solver import LayerProblem, SparsityPattern

from .blocks import LayerReport, Solved, SolveLayers, solve_linear
from .errors import SettingError
from .remote import register_by_reference

__all__ = ["RunnerKind", "make_task_runner", "solve_layer", "solve_with_runner", "worker_devices"]

RunnerKind = Literal["threads", "dask", "ray"]
_PROBLEM_FIELDS = ("weight", "gram", "input_mean", "input_var")


def make_task_runner(kind: RunnerKind, workers: int, address: str | None = None):
    """A Prefect task runner with ``workers`` workers (``address``: an existing Dask or Ray cluster)."""
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        # Threads inside one process by default: Dask worker processes each need the Prefect API, which a
        # temporary local server cannot give them (see STACK.md); point `address` at a real cluster for
        # processes on other machines.
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "processes": False, "threads_per_worker": 1})
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise SettingError("task_runner", kind, "prefect-ray is not installed",
                               "pip install -e '.[ray]', or use threads or dask") from None
        return RayTaskRunner(address=address) if address else RayTaskRunner()
    raise SettingError("task_runner", kind, "unknown task runner", "use threads, dask or ray")


def worker_devices(device: torch.device) -> list[torch.device]:
    """The devices layer solves are spread over: every visible GPU for cuda, else the one device."""
    if device.type == "cuda" and device.index is None:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [device]


def _save_problem(problem: LayerProblem, path: Path) -> None:
    tensors = {f: getattr(problem, f).contiguous().cpu() for f in _PROBLEM_FIELDS if getattr(problem, f) is not None}
    save_file(tensors, str(path), metadata={"n_tokens": str(problem.n_tokens or 0)})


def _load_problem(path: Path, device: torch.device) -> LayerProblem:
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        n_tokens = int(handle.metadata()["n_tokens"]) or None
    return LayerProblem(n_tokens=n_tokens, **tensors)


@task(name="solve-layer", task_run_name="solve-{name}")
def solve_layer(name: str, group: str, problem_path: str, solution_path: str, pattern: str, method: str,
                method_config: dict[str, Any] | None, device: str, threads: int | None = None) -> dict[str, Any]:
    """Solve one layer problem from its file; write the pruned weight to ``solution_path``."""
    if threads:
        torch.set_num_threads(threads)
    problem = _load_problem(Path(problem_path), torch.device(device))
    report, weight = solve_linear(name, group, problem, SparsityPattern.parse(pattern), method, method_config)
    save_file({"weight": weight.contiguous().cpu()}, solution_path)
    return asdict(report)


def solve_with_runner(runner_factory, work: Path, pattern: SparsityPattern, method: str,
                      method_config: dict[str, Any] | None, devices: list[torch.device],
                      threads: int | None = None) -> SolveLayers:
    """A ``SolveLayers`` that submits one ``solve-layer`` task per layer to a fresh task runner."""

    def solve_all(problems: dict[str, LayerProblem], group_of: dict[str, str]) -> dict[str, Solved]:
        work.mkdir(parents=True, exist_ok=True)
        # Largest problems first (a solve costs about d_out d_in^2): with fewer workers than layers, the
        # longest solve then starts at once instead of running alone at the end.
        largest_first = sorted(problems.items(), key=lambda item: -item[1].d_out * item[1].d_in ** 2)
        try:
            futures = {}
            with runner_factory() as runner:
                for position, (name, problem) in enumerate(largest_first):
                    problem_path = work / f"{name}.problem.safetensors"
                    _save_problem(problem, problem_path)
                    futures[name] = runner.submit(solve_layer, parameters={
                        "name": name, "group": group_of[name], "problem_path": str(problem_path),
                        "solution_path": str(work / f"{name}.solution.safetensors"), "pattern": str(pattern),
                        "method": method, "method_config": method_config,
                        "device": str(devices[position % len(devices)]), "threads": threads,
                    })
                reports = {name: futures[name].result() for name in problems}
            solved = {}
            for name, report in reports.items():
                with safe_open(str(work / f"{name}.solution.safetensors"), framework="pt") as handle:
                    weight = handle.get_tensor("weight")
                solved[name] = (LayerReport(**report), weight)
            return solved
        finally:
            shutil.rmtree(work, ignore_errors=True)

    return solve_all


register_by_reference(globals())  # Dask/Ray workers import these tasks and flows (see tasks/remote.py)
