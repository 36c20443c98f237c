"""Defaults that more than one settings class shares, written once."""

DEFAULT_MODEL = "smollm2-135m"  # the bundled model: it runs on any machine, with no download
DEFAULT_EXPERIMENT = "alps"  # the MLflow experiment runs are tracked in
