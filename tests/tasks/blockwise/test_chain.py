"""The block chain's resume plan, on hand-made cache states a reader can check by eye, and its keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.blockwise.chain import RunKeys, plan_chain, run_keys, solver_identity
from tasks.blockwise.records import BlockResult, CalibrationResult, FileRecord
from tasks.config.prune import PruneConfig, SolverSpec
from tasks.model.prepared import PreparedModel

CODES = {"reuse": "u", "replay": "r", "compute": "c"}
KEYS = RunKeys(calibration="c", blocks=tuple(f"b{i}" for i in range(5)), seqlen=4)


def record(folder: Path, name: str, state: str = "intact") -> FileRecord:
    """A file's record; ``state`` "gone" deletes the file, "damaged" changes a byte after recording."""
    path = folder / name
    path.write_bytes(b"tensor bytes of " + name.encode())
    made = FileRecord.of(path)
    if state == "gone":
        path.unlink()
    elif state == "damaged":
        path.write_bytes(b"Tensor bytes of " + name.encode())  # same size, other content
    return made


def cached(folder: Path, layout: str, calibration: str = "intact") -> tuple[CalibrationResult, list]:
    """Cached results from a layout string, one character per block: ``w`` weights and outputs intact, ``r``
    weights intact but outputs released, ``d`` weights damaged, ``-`` nothing cached."""
    inputs = CalibrationResult(key="c", inputs=record(folder, "calibration", calibration), seqlen=4, tokens=8,
                               tokens_sha256="t")
    blocks = []
    for index, code in enumerate(layout):
        if code == "-":
            blocks.append(None)
            continue
        weights = record(folder, f"w{index}", "damaged" if code == "d" else "intact")
        outputs = record(folder, f"o{index}", "gone" if code == "r" else "intact")
        blocks.append(BlockResult(key=f"b{index}", index=index, weights=weights, outputs=outputs, layers=[],
                                  seconds=1.0, memory={}))
    return inputs, blocks


@pytest.mark.parametrize(("layout", "calibration", "capture", "actions"), [
    ("-----", "intact", "reuse", "ccccc"),  # a first run (the calibration already cached)
    ("ww---", "intact", "reuse", "uuccc"),  # killed after block 1: resume at block 2 from block 1's outputs
    ("wr---", "intact", "reuse", "urccc"),  # block 1's outputs are gone: replay it from block 0's
    ("rr---", "gone", "replay", "rrccc"),  # nothing left to start from: capture the inputs again
    ("rrrrr", "gone", "reuse", "uuuuu"),  # a finished run, activations released: everything is reused
    ("rdrrr", "gone", "replay", "rcuuu"),  # damaged weights of block 1: recompute it; the later blocks stay
    ("wwwrd", "intact", "reuse", "uuurc"),  # walk back only as far as the last intact outputs (block 2's)
])
def test_the_plan_reuses_replays_and_solves_what_it_must(tmp_path, layout, calibration, capture, actions):
    inputs, blocks = cached(tmp_path, layout, calibration)
    chain = plan_chain(KEYS, inputs, blocks)
    assert chain.calibration.action == capture
    assert "".join(CODES[link.action] for link in chain.blocks) == actions
    assert [link.key for link in chain.blocks] == list(KEYS.blocks)
    assert [link.refresh for link in chain.blocks] == [a != "u" for a in actions]


def test_without_a_cached_calibration_it_is_computed(tmp_path):
    chain = plan_chain(KEYS, None, [None] * 5)
    assert chain.calibration.action == "compute" and chain.calibration.refresh
    assert chain.indices("compute") == [0, 1, 2, 3, 4]


def prepared(fingerprint: str = "sha256:abc", layers: int = 3) -> PreparedModel:
    return PreparedModel(reference="m", folder=Path("/nowhere"), fingerprint=fingerprint, model_type="llama",
                         num_layers=layers, max_positions=2048)


def test_keys_chain_everything_upstream():
    config = PruneConfig(solver={"pattern": "0.5"}, calibration={"dataset": "pydoc", "nsamples": 4, "seqlen": 32})
    keys = run_keys(prepared(), config, 32, "text")
    assert len(set(keys.blocks)) == 3 and keys.calibration not in keys.blocks
    assert run_keys(prepared(), config, 32, "text") == keys  # deterministic
    # A change upstream changes every key after it; where the run executes changes none.
    assert run_keys(prepared("sha256:other"), config, 32, "text").calibration != keys.calibration
    assert run_keys(prepared(), config, 32, "other text").blocks[2] != keys.blocks[2]
    other_seed = config.model_copy(update={"calibration": config.calibration.model_copy(update={"seed": 1})})
    assert run_keys(prepared(), other_seed, 32, "text").blocks[0] != keys.blocks[0]
    other_pattern = PruneConfig(**{**config.model_dump(), "solver": {"pattern": "0.6"}})
    changed = run_keys(prepared(), other_pattern, 32, "text")
    assert changed.calibration == keys.calibration and changed.blocks[0] != keys.blocks[0]
    elsewhere = PruneConfig(**{**config.model_dump(), "runtime": {"threads": 7, "solve_workers": 3,
                                                                 "cache_dir": "/elsewhere"}})
    assert run_keys(prepared(), elsewhere, 32, "text") == keys


def test_the_solver_identity_is_the_full_config_not_its_spelling():
    default = SolverSpec(method="alps")
    spelled = SolverSpec(method="alps", method_config={"max_iter": default.solver_config.max_iter})
    assert solver_identity(spelled) == solver_identity(default)
    assert solver_identity(SolverSpec(method="alps", method_config={"max_iter": 7})) != solver_identity(default)
