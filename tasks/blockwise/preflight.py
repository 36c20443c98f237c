"""Checks made before any work, so that a run which cannot succeed fails in seconds, not hours in.

``check_inputs`` makes every check a run's settings allow before a weight is loaded: the output and cache
folders, the device, the data root, the model reference (read from its config alone), the pattern against every
layer's shape and the calibration text against ``nsamples`` windows of ``seqlen`` tokens. The command line calls
it before it starts the flow, so a bad input is one line, not a failed flow run. Its errors name the field by
its path in ``PruneConfig`` (``calibration.nsamples``), which the command line spells as the flag it was given
by (``tasks.config.validation.spelled_as``). The flow itself claims the output folder for the whole run and
checks it again under the claim (``claim_output_folder``), and checks the pattern on the prepared model
(``check_pattern_fits``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from alps_solver import PatternKind, SparsityPattern

from ..common.errors import AlpsError, ModelReferenceError
from ..common.files import remove_dead_temporaries
from ..common.locks import claim_folder
from ..config.prune import OutputConfig, PruneConfig, RuntimeConfig, SolverSpec
from ..config.validation import spelled_as
from ..data.registry import resolve_data_root
from ..data.sampling import check_calibration_size
from ..model.loading import resolve_device
from ..model.prepared import PreparedModel, linear_shapes
from ..model.references import locate_model
from ..model.structure import plan_structure
from ..planning.check import config_of, shape_of
from .export import saved_report

__all__ = ["check_cache_folder", "check_inputs", "check_output_folder", "check_pattern_fits", "claim_output_folder",
           "same_run"]


def check_inputs(config: PruneConfig, other_patterns: Sequence[SparsityPattern] = ()) -> None:
    """Every check of ``config`` that loads no weight; a bad input raises AlpsError naming its field.
    ``other_patterns`` (a sweep's) are checked against the model's layers too."""
    check_output_folder(config.output, config)
    check_cache_folder(config.runtime)
    with spelled_as({"device": "runtime.device"}):
        resolve_device(config.runtime.device)  # present on this machine
    resolve_data_root(config.runtime.data_dir)  # names --data-dir, or $ALPS_DATA_DIR when that is what is wrong
    shape = shape_of(config.model)  # the reference resolves; its config gives one block's layer shapes
    shapes = {f"{layer.name} of every block": (layer.d_out, layer.d_in) for layer in shape.linears}
    for pattern in (config.solver.pattern, *other_patterns):
        _check_layers(shapes, pattern)
    if config.solver.structured is not None:  # the neurons and heads it removes exist and leave some
        plan_structure(config_of(config.model), config.solver.structured)
    seqlen = config.calibration.seqlen  # as the run caps it, at the model's positions
    seqlen = min(seqlen, shape.max_positions) if shape.max_positions else seqlen
    tokenizer = _tokenizer(config.model)
    with spelled_as({"nsamples": "calibration.nsamples", "seqlen": "calibration.seqlen"}):
        check_calibration_size(config.calibration.dataset, tokenizer, nsamples=config.calibration.nsamples,
                               seqlen=seqlen, data_dir=config.runtime.data_dir)


def check_output_folder(output: OutputConfig, config: PruneConfig | None = None) -> None:
    """The output folder can be written: it does not exist, is empty, or may be replaced (``overwrite``); or it
    holds the model an earlier attempt of the same run (``config``) saved before it was stopped, which the run
    keeps if its result is the same (``tasks.blockwise.export.saved_earlier``)."""
    folder = Path(output.folder)
    if folder.exists() and not folder.is_dir():
        raise AlpsError("output.folder", str(folder), "exists and is not a folder", "choose a folder path")
    if config is not None and same_run(folder, config):
        return
    if folder.is_dir() and any(folder.iterdir()) and not output.overwrite:
        raise AlpsError(
            "output.folder", str(folder), "the folder exists and is not empty",
            "choose a new folder, or pass --overwrite to replace it once the new model is complete",
        )


@contextmanager
def claim_output_folder(output: OutputConfig, config: PruneConfig | None = None) -> Iterator[None]:
    """Hold the output folder against other runs for the body (a second run writing it at the same time is
    refused: ``FolderInUse``), once it is checked to be writable (``check_output_folder``, under the claim so
    that a run which finished meanwhile is seen; ``config``: this run's, see there)."""
    folder = Path(output.folder).resolve()
    with claim_folder(folder):
        remove_dead_temporaries(folder.parent, folder.name)  # a killed save's half-written folder
        check_output_folder(output, config)
        yield


def same_run(folder: Path, config: PruneConfig) -> bool:
    """Whether ``folder`` holds a pruned model whose report records ``config``: the same command saved it."""
    saved = saved_report(folder)
    return saved is not None and saved.get("config") == config.model_dump(mode="json")


def check_cache_folder(runtime: RuntimeConfig) -> None:
    """The cache folder is a folder, or can be made one."""
    folder = runtime.resolved_cache_dir()
    if folder.exists() and not folder.is_dir():
        raise AlpsError("runtime.cache_dir", str(folder), "exists and is not a folder",
                        "choose a folder path (a rerun with the same folder resumes)")


def check_pattern_fits(model: PreparedModel, solver: SolverSpec) -> None:
    """Every prunable linear of every block can carry the solver's pattern and keeps some of its weights; with
    structured pruning, the structure fits the model's neurons and heads (``plan_structure``)."""
    if solver.structured is None:
        _check_layers(linear_shapes(model), solver.pattern)
        return
    patterns = plan_structure(AutoConfig.from_pretrained(model.folder), solver.structured).patterns
    shapes = linear_shapes(model)
    for name, pattern in patterns.items():
        _check_layers({layer: shape for layer, shape in shapes.items() if layer.endswith(name)}, pattern)


def _check_layers(shapes: dict[str, tuple[int, int]], pattern: SparsityPattern) -> None:
    """Each (d_out, d_in) of ``shapes`` (by layer name) can carry ``pattern`` and keeps some of its weights."""
    for name, (d_out, d_in) in shapes.items():
        try:
            pattern.validate_shape(d_out, d_in)
        except ValueError as error:
            raise AlpsError("solver.pattern", str(pattern), f"layer {name} ({d_out}x{d_in}): {str(error).rstrip('.')}",
                            "choose a pattern every layer can carry") from None
    empty = [name for name, shape in shapes.items() if pattern.kept_count(*shape) == 0]
    if empty:  # only a fraction pattern rounds down to nothing: keeping one of the smallest unit is the limit
        per_input = pattern.kind in (PatternKind.PER_ROW, PatternKind.INPUT_CHANNELS)
        unit = min(d_in if per_input else d_out * d_in for d_out, d_in in shapes.values())
        d_out, d_in = shapes[empty[0]]
        raise AlpsError("solver.pattern", str(pattern),
                        f"layer {empty[0]} ({d_out}x{d_in}) would keep none of its weights"
                        + (f", and {len(empty) - 1} more layers" if len(empty) > 1 else ""),
                        f"use a sparsity of at most {int((1 - 1 / unit) * 1e6) / 1e6:g}, which keeps weights in "
                        "every layer")


def _tokenizer(reference: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, which the calibration windows are cut with."""
    source = locate_model(reference)
    try:
        return AutoTokenizer.from_pretrained(source.location, revision=source.revision)
    except (OSError, ValueError) as error:  # transformers' ways of saying the files are missing or unreadable
        raise ModelReferenceError("model", reference, f"its tokenizer does not load ({str(error).splitlines()[0]})",
                                  "give a model folder that holds its tokenizer files (tokenizer.save_pretrained)"
                                  ) from None
