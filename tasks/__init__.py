"""The pipeline around the solver, in two layers.

Library code lives in subpackages that never import Prefect or ``flows`` (a test enforces it):

- ``common``: user errors, files (atomic writes, content hashes, the cache root, storage errors), locks
  (cache entries and output folders shared by concurrent runs), stopping on SIGTERM/SIGINT;
- ``config``: the validated settings of every flow, and every default;
- ``model``: model references, GGUF conversion, loading, architecture adapters, checkpoints;
- ``data``: the named data sets, their loaders, calibration sampling;
- ``blockwise``: block inputs, Gram collection, layer and block solves, the block chain, export, the report;
- ``evaluation``: perplexity and lm-eval zero-shot accuracy;
- ``planning``: the resource plan (disk, RAM, device memory, time) before a run;
- ``tracking``: MLflow runs, plots, sweep summaries, a store that is down.

The Prefect layer is the modules at this level, one per flow (``prune``, ``evaluate``, ``sweep``), plus
``orchestration`` (how tasks are declared and cached) and ``local_api`` (the Prefect API server a command starts
for itself, which dies with it). They are thin: each task calls the library.
"""
