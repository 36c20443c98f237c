"""The pipeline around the solver, in two layers.

Library code lives in subpackages that never import Prefect or ``flows`` (a test enforces it):

- ``common``: user errors, files (atomic writes, content hashes, the cache root);
- ``config``: the validated settings of every flow, and every default;
- ``model``: model references, GGUF conversion, loading, architecture adapters, checkpoints;
- ``data``: the named data sets, their loaders, calibration sampling;
- ``blockwise``: block inputs, Gram collection, layer and block solves, the block chain, export, the report;
- ``evaluation``: perplexity and lm-eval zero-shot accuracy;
- ``tracking``: MLflow runs, plots, sweep summaries.

The Prefect layer is the modules at this level, one per flow (``prune``, ``evaluate``, ``sweep``), plus
``orchestration`` (how tasks are declared and cached). They are thin: each task calls the library.
"""
