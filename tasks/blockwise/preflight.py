"""Checks made before any work, so that a run which cannot succeed fails in seconds, not hours in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alps_solver import SparsityPattern

from ..common.errors import AlpsError
from ..common.files import remove_dead_temporaries
from ..common.locks import claim_folder
from ..config.prune import OutputConfig
from ..model.prepared import PreparedModel, linear_shapes

__all__ = ["check_output_folder", "check_pattern_fits", "claim_output_folder"]


def check_output_folder(output: OutputConfig) -> None:
    """The output folder can be written: it does not exist, is empty, or may be replaced (``overwrite``)."""
    folder = Path(output.folder)
    if folder.exists() and not folder.is_dir():
        raise AlpsError("output", str(folder), "exists and is not a folder", "choose a folder path")
    if folder.is_dir() and any(folder.iterdir()) and not output.overwrite:
        raise AlpsError(
            "output", str(folder), "the folder exists and is not empty",
            "choose a new folder, or pass --overwrite to replace it once the new model is complete",
        )


@contextmanager
def claim_output_folder(output: OutputConfig) -> Iterator[None]:
    """Hold the output folder against other runs for the body (a second run writing it at the same time is
    refused: ``FolderInUse``), once it is checked to be writable (``check_output_folder``, under the claim so
    that a run which finished meanwhile is seen)."""
    folder = Path(output.folder).resolve()
    with claim_folder(folder):
        remove_dead_temporaries(folder.parent, folder.name)  # a killed save's half-written folder
        check_output_folder(output)
        yield


def check_pattern_fits(model: PreparedModel, pattern: SparsityPattern) -> None:
    """Every prunable linear of every block can carry ``pattern``."""
    for tensor_name, (d_out, d_in) in linear_shapes(model).items():
        try:
            pattern.validate_shape(d_out, d_in)
        except ValueError as error:
            raise AlpsError("pattern", str(pattern), f"layer {tensor_name} ({d_out}x{d_in}): {error}",
                            "choose a pattern every layer can carry") from None
