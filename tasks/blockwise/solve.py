"""Pruning the linear layers of one decoder block: group by group, one solver call per layer.

Vocabulary: a *layer* is one linear (``solve_layer``); a *group* is the layers that read the same input and
so share one H (q/k/v, gate/up; ``solve_group``); a *stage* is the groups solved on one forward pass's
problems. By default a block is one stage: every layer sees the dense block's inputs (as SparseGPT and ALPS
do). With ``true_sequential`` every group is its own stage, solved after the groups before it were pruned,
on the inputs the pruned earlier groups produce. ``prune_linears`` runs the stages and writes the pruned
weights into the block in place. With dense targets (``SolverSpec.targets``) every layer is fitted to the dense
model's output instead of its own dense output, or to a mix of the two (``SolverSpec.target_mix``): its problems
carry the cross Gram with the dense model's inputs.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

from alps_solver import GramCache, LayerProblem, SparsityPattern, solve
from alps_solver.methods import needs_input_stats

from ..config.prune import SolverSpec
from .capture import BlockInputs
from .gram import collect_layer_problems, discover_groups
from .records import LayerReport

__all__ = ["SolveStage", "Solved", "by_group", "prune_linears", "solve_group", "solve_layer"]

logger = logging.getLogger(__name__)


Solved = tuple[LayerReport, torch.Tensor]  # a layer's report and its pruned weight
# Solves the layer problems of one stage: (problems by name, group of each name, pattern of each name)
# -> {name: (report, weight)}
SolveStage = Callable[[dict[str, LayerProblem], dict[str, str], dict[str, SparsityPattern]], dict[str, Solved]]


def prune_linears(
    block: nn.Module,
    inputs: BlockInputs,
    solver: SolverSpec,
    *,
    batch_size: int = 8,
    solve_stage: SolveStage | None = None,
    patterns: Mapping[str, SparsityPattern] | None = None,
) -> list[LayerReport]:
    """Prune the linear layers of ``block`` in place; returns one report per solved layer, in execution order.

    ``solve_stage(problems, group_of, patterns)`` solves the independent layer problems of a stage (default:
    group by group in this process); the pipeline passes one that runs them through a Prefect task runner.
    ``patterns`` (layer name -> pattern: a sparsity allocation's, or structured pruning's) replaces the solver's
    pattern: exactly the layers it names are solved, the others keep their weights.
    """
    groups = discover_groups(block, inputs)
    if patterns is None:
        patterns = {name: solver.pattern for group in groups for name in group}
    unknown = sorted(set(patterns) - {name for group in groups for name in group})
    if unknown:
        raise KeyError(f"patterns name layers the block does not have: {unknown}")
    groups = [kept for group in groups if (kept := [name for name in group if name in patterns])]
    stages = [[group] for group in groups] if solver.true_sequential else [groups]
    dense_block = None
    if solver.targets == "dense":
        # The dense layer inputs come from the dense block: the block itself in a single stage (nothing in it is
        # pruned yet when its problems are collected), a dense copy when later stages run on a pruned part.
        dense_block = copy.deepcopy(block) if len(stages) > 1 else block
    solve_stage = solve_stage or solve_in_process(solver)
    linears = dict(block.named_modules())
    group_of = {name: group[0] for group in groups for name in group}
    reports: list[LayerReport] = []
    for stage in stages:
        names = [name for group in stage for name in group]
        problems = collect_layer_problems(block, inputs, names, batch_size=batch_size,
                                          gram_dtype=getattr(torch, solver.gram_dtype), groups=groups,
                                          input_stats=needs_input_stats(solver.method), dense_block=dense_block,
                                          target_mix=solver.target_mix)
        solved = solve_stage(problems, group_of, {name: patterns[name] for name in names})
        for name in names:
            report, weight = solved[name]
            module = linears[name]
            module.weight.data = weight.to(device=module.weight.device, dtype=module.weight.dtype)
            reports.append(report)
    return reports


def solve_in_process(solver: SolverSpec) -> SolveStage:
    """A ``SolveStage`` that solves the groups one after another in this process."""

    def solve_all(problems: dict[str, LayerProblem], group_of: dict[str, str],
                  patterns: dict[str, SparsityPattern]) -> dict[str, Solved]:
        solved: dict[str, Solved] = {}
        for group, members in by_group(problems, group_of).items():
            solved.update(solve_group(group, {n: problems[n] for n in members}, solver, patterns))
        return {name: solved[name] for name in problems}

    return solve_all


def solve_group(group: str, problems: dict[str, LayerProblem], solver: SolverSpec,
                patterns: Mapping[str, SparsityPattern]) -> dict[str, Solved]:
    """Solve layers of one group, one after another, each to its pattern: they share H, so what a method derives
    from it is derived once (one ``GramCache``)."""
    cache = GramCache()
    return {name: solve_layer(name, group, problem, solver, patterns[name], cache)
            for name, problem in problems.items()}


def by_group(problems: dict[str, LayerProblem], group_of: dict[str, str]) -> dict[str, list[str]]:
    """The problems' names by group, in the order given: the members of a group share one H."""
    groups: dict[str, list[str]] = {}
    for name in problems:
        groups.setdefault(group_of[name], []).append(name)
    return groups


def solve_layer(name: str, group: str, problem: LayerProblem, solver: SolverSpec, pattern: SparsityPattern,
                cache: GramCache | None = None) -> Solved:
    """Solve one layer to ``pattern``; ``cache`` is shared with the other members of its group (see
    ``GramCache``)."""
    start = time.perf_counter()
    result = solve(problem, pattern, method=solver.method, config=solver.solver_config, cache=cache)
    report = LayerReport(
        name=name,
        shape=list(problem.weight.shape),
        group=group,
        method=solver.method,
        pattern=str(pattern),
        target_sparsity=pattern.sparsity,
        achieved_sparsity=result.sparsity,
        rel_error=result.rel_error,
        rel_error_before_backsolve=result.rel_error_before_backsolve,
        iterations=result.iterations,
        status=result.status.value,
        seconds=time.perf_counter() - start,
        solver=result.summary(),
    )
    logger.debug("%-24s %s err %.5f it %3d %5.2fs", name, result.status.value, result.rel_error,
                 result.iterations, report.seconds)
    return report, result.weight
