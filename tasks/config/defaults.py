"""Defaults that more than one settings class shares, written once."""

from typing import Literal

DEFAULT_MODEL = "smollm2-135m"  # the bundled model: it runs on any machine, with no download
DEFAULT_EXPERIMENT = "alps"  # the MLflow experiment runs are tracked in

# What a run does when the MLflow store cannot record it. required: refuse before any work, and end a run whose
# tracking failed midway with exit status 3 (after the model is saved); optional: go on untracked, with a warning.
TrackingMode = Literal["required", "optional"]
DEFAULT_TRACKING: TrackingMode = "required"
TRACKING_HELP = ("required: refuse to start when the MLflow store cannot record runs, and end with exit status 3 "
                 "if tracking fails midway (the model is saved all the same); optional: run untracked, with a "
                 "warning")
