"""Two ``alps prune`` processes at once on one cache folder, and on one output folder."""

from __future__ import annotations

import json
import time

from .processes import assert_same_tensors, environment, prune_args, start


def _wait_for(run, text: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in run.stderr():
        assert run.process.poll() is None, f"the run ended before saying {text!r}:\n{run.stderr()}"
        assert time.monotonic() < deadline, f"the run never said {text!r}:\n{run.stderr()}"
        time.sleep(0.1)


def test_two_runs_on_one_cache_folder_share_its_blocks_and_both_end_bit_identical(fault_model, reference, home):
    """The first run is held in block 1; the second reuses block 0 and waits for block 1 instead of solving it
    again. Each block is solved once, by one of them, and both outputs equal the uninterrupted run's."""
    env = environment(home)
    first = start(prune_args(fault_model, home / "out-1", home / "cache"), env, home / "first", pause="block")
    first.wait_for_pause()
    second = start(prune_args(fault_model, home / "out-2", home / "cache"), env, home / "second")
    _wait_for(second, "block 01 is being computed by another run")
    first.resume()
    assert first.wait() == 0, first.stderr()
    assert second.wait() == 0, second.stderr()
    first.assert_no_process_left()
    second.assert_no_process_left()

    computed = []
    for output in (home / "out-1", home / "out-2"):
        assert_same_tensors(output, reference)
        computed.append(set(json.loads((output / "prune_report.json").read_text())["computed_blocks"]))
    assert computed[0] | computed[1] == {0, 1, 2, 3} and not computed[0] & computed[1], computed
    assert computed[1].isdisjoint({0, 1}), "the second run reused what the first one had solved"


def test_a_second_run_on_the_same_output_folder_is_refused_and_the_first_wins_whole(fault_model, reference, home):
    env = environment(home)
    first = start(prune_args(fault_model, home / "out", home / "cache-1"), env, home / "first", pause="block")
    first.wait_for_pause()
    for attempt, extra in enumerate(([], ["--overwrite"])):
        second = start(prune_args(fault_model, home / "out", home / "cache-2", *extra), env, home / f"second-{attempt}")
        assert second.wait() == 2, second.stderr()
        assert "another run is writing this folder" in second.stderr() and "Traceback" not in second.stderr()
        second.assert_no_process_left()
    assert not (home / "cache-2" / "blocks").exists(), "the refused run did no work"
    first.resume()
    assert first.wait() == 0, first.stderr()
    assert_same_tensors(home / "out", reference)
