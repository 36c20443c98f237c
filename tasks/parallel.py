"""Parallel layer solves: the independent layer problems of a block through a Prefect task runner.

The unit of work is a group: the layers that read the same input (q/k/v, gate/up) and so share one H.
Each group's problems (H and the input statistics once, every member's W) are written to a safetensors
file; a ``solve-group`` task loads it on its worker's device, solves the members one after another with
one ``GramCache`` (so ALPS decomposes the shared H once), and writes each pruned weight to a file of its
own, returning only the small reports. A stage with fewer groups than workers is split into one task per
layer instead, so that no worker idles. So the same code runs on a thread pool (default), on Dask
(``prefect-dask``, a local cluster or an existing one by address) or on Ray (``prefect-ray``, optional
extra), and no tensor is ever pickled into a task parameter or result. Solves are deterministic, so the
pruned weights are identical to a sequential run whatever the runner and worker count.
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

from .blocks import LayerReport, Solved, SolveLayers, by_group, solve_members
from .errors import SettingError
from .remote import register_by_reference

__all__ = ["RunnerKind", "make_task_runner", "solve_group", "solve_with_runner", "worker_devices"]

RunnerKind = Literal["threads", "dask", "ray"]
_SHARED_FIELDS = ("gram", "input_mean", "input_var")  # one per group: what its members' inputs determine


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


def _save_group(problems: dict[str, LayerProblem], path: Path) -> None:
    """One group's problems in one file: the shared H and input statistics once, each member's W."""
    first = next(iter(problems.values()))
    for name, problem in problems.items():
        if problem.gram is not first.gram and not torch.equal(problem.gram, first.gram):
            raise ValueError(f"{name} is grouped with layers that read another input: its H differs")
    shared = {f: getattr(first, f) for f in _SHARED_FIELDS if getattr(first, f) is not None}
    tensors = {f: t.contiguous().cpu() for f, t in shared.items()}
    tensors.update({f"weight.{name}": p.weight.contiguous().cpu() for name, p in problems.items()})
    save_file(tensors, str(path), metadata={"n_tokens": str(first.n_tokens or 0)})


def _load_group(path: Path, device: torch.device) -> dict[str, LayerProblem]:
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        n_tokens = int(handle.metadata()["n_tokens"]) or None
    shared = {f: tensors[f] for f in _SHARED_FIELDS if f in tensors}  # one H tensor for every member
    members = sorted(k for k in tensors if k.startswith("weight."))
    return {key.removeprefix("weight."): LayerProblem(weight=tensors[key], n_tokens=n_tokens, **shared)
            for key in members}


@task(name="solve-group", task_run_name="solve-{unit}")
def solve_group(unit: str, group: str, names: list[str], problem_path: str, work: str, pattern: str, method: str,
                method_config: dict[str, Any] | None, device: str, threads: int | None = None) -> list[dict[str, Any]]:
    """Solve layers of ``group`` (``unit``: the group, or the one layer of it this task solves) from their
    file, in ``names`` order, sharing what is derived from their H; write each pruned weight to
    ``work/<name>.solution.safetensors``."""
    if threads:
        torch.set_num_threads(threads)
    problems = _load_group(Path(problem_path), torch.device(device))
    solved = solve_members(group, {n: problems[n] for n in names}, SparsityPattern.parse(pattern), method,
                           method_config)
    for name, (_, weight) in solved.items():
        save_file({"weight": weight.contiguous().cpu()}, str(Path(work) / f"{name}.solution.safetensors"))
    return [asdict(report) for report, _ in solved.values()]


def solve_with_runner(runner_factory, work: Path, pattern: SparsityPattern, method: str,
                      method_config: dict[str, Any] | None, devices: list[torch.device],
                      threads: int | None = None, workers: int = 1) -> SolveLayers:
    """A ``SolveLayers`` that submits one ``solve-group`` task per group of layers sharing H to a fresh
    task runner; when a stage has fewer groups than ``workers`` (a true-sequential stage is one group),
    one task per layer instead, so no worker idles (each such task derives H's factors itself)."""

    def solve_all(problems: dict[str, LayerProblem], group_of: dict[str, str]) -> dict[str, Solved]:
        work.mkdir(parents=True, exist_ok=True)
        units = [(group, group, members) for group, members in by_group(problems, group_of).items()]
        if len(units) < workers:
            units = [(name, group, [name]) for _, group, members in units for name in members]

        # Largest first (a solve costs about d_out d_in^2): with fewer workers than tasks, the longest
        # work then starts at once instead of running alone at the end.
        def cost(unit: tuple[str, str, list[str]]) -> int:
            return -sum(problems[n].d_out * problems[n].d_in ** 2 for n in unit[2])

        try:
            futures = []
            with runner_factory() as runner:
                for position, (unit, group, members) in enumerate(sorted(units, key=cost)):
                    problem_path = work / f"{unit}.problems.safetensors"
                    _save_group({n: problems[n] for n in members}, problem_path)
                    futures.append(runner.submit(solve_group, parameters={
                        "unit": unit, "group": group, "names": members, "problem_path": str(problem_path),
                        "work": str(work), "pattern": str(pattern), "method": method,
                        "method_config": method_config, "device": str(devices[position % len(devices)]),
                        "threads": threads,
                    }))
                reports = {r["name"]: r for future in futures for r in future.result()}
            solved = {}
            for name in problems:
                with safe_open(str(work / f"{name}.solution.safetensors"), framework="pt") as handle:
                    weight = handle.get_tensor("weight")
                solved[name] = (LayerReport(**reports[name]), weight)
            return solved
        finally:
            shutil.rmtree(work, ignore_errors=True)

    return solve_all


register_by_reference(globals())  # Dask/Ray workers import these tasks and flows (see tasks/remote.py)
