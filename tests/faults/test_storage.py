"""A disk that fills during a block or during the save, and a read-only output place, with real processes.

Each case runs in a private mount namespace (``unshare -rm``: no root needed where user namespaces are
enabled) on a small tmpfs filled by a ballast file, so the runs see a real ENOSPC or EROFS from the kernel.
The resource check is off in the runs that are to fail mid-run (``--no-resource-check``): it would refuse them
before any work, which is what a user gets by default, but not the fault tested here (someone else fills
the disk during the run). Freeing space is deleting the ballast; the same command then resumes.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

from .processes import REPO, assert_same_tensors, environment, prune_args

# Fill the tmpfs at $1 (size $2), then give back $3 of it.
_FILL = """
fill() {{ mount -t tmpfs -o size=$2 tmpfs "$1" && (dd if=/dev/zero of="$1/ballast" bs=64k 2>/dev/null || true) \
          && truncate -s -$3 "$1/ballast"; }}
alps() {{ log=$1; shift; {python} -m tests.faults.driver none "$log.paused" -- "$@" >"$log.out" 2>"$log.err"; \
          echo $? >"$log.rc"; }}
"""


def _in_namespace(script: str, env: dict[str, str]) -> None:
    done = subprocess.run(["unshare", "-rm", "bash", "-c", "set -u\n" + _FILL.format(python=sys.executable) + script],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"the namespace script failed (unshare needs user namespaces):\n{done.stderr}"


def _result(home, name: str) -> tuple[int, str]:
    return int((home / f"{name}.rc").read_text()), (home / f"{name}.err").read_text()


def _args(*args) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def test_a_cache_disk_that_fills_during_a_block_stops_the_run_clearly_and_a_rerun_resumes(fault_model, reference,
                                                                                          home):
    disk = home / "disk"
    disk.mkdir()
    args = prune_args(fault_model, home / "out", disk / "cache", "--no-resource-check")
    # 400 kB: room for the calibration inputs (128 kB) and records, not for block 0's weights (660 kB).
    _in_namespace(f"""
fill {disk} 16m 400K
alps {home}/full {_args(*args)}
find {disk} -name '.*.tmp' > {home}/full.left
ls -A {home} | grep -x out > {home}/full.output || true
rm {disk}/ballast
alps {home}/freed {_args(*args)}
""", environment(home))
    code, stderr = _result(home, "full")
    assert code == 2, stderr
    assert "no space left on the device" in stderr and str(disk / "cache") in stderr and "Traceback" not in stderr
    assert "run the same command again" in stderr
    assert (home / "full.left").read_text() == "", "nothing half-written is left in the cache"
    assert (home / "full.output").read_text() == "", "no output folder after the failed run"
    code, stderr = _result(home, "freed")
    assert code == 0, stderr
    assert_same_tensors(home / "out", reference)


def test_an_output_disk_that_fills_during_the_save_leaves_no_folder_and_a_rerun_saves_from_the_cache(
        fault_model, reference, home):
    disk = home / "disk"
    disk.mkdir()
    args = prune_args(fault_model, disk / "out", home / "cache", "--no-resource-check")
    _in_namespace(f"""
fill {disk} 48m 2M
alps {home}/full {_args(*args)}
ls -A {disk} > {home}/full.left
rm {disk}/ballast
alps {home}/freed {_args(*args)}
cp -r {disk}/out {home}/saved
""", environment(home))
    code, stderr = _result(home, "full")
    assert code == 2, stderr
    assert "no space left on the device" in stderr and str(disk / "out") in stderr and "Traceback" not in stderr
    assert (home / "full.left").read_text().split() == ["ballast"], "no output folder, no temporary one"
    code, stderr = _result(home, "freed")
    assert code == 0, stderr
    assert "4 of 4 blocks cached" in stderr, "the rerun solves nothing again"
    assert_same_tensors(home / "saved", reference)


def test_a_read_only_output_place_is_refused_before_any_work(fault_model, home):
    disk = home / "disk"
    disk.mkdir()
    _in_namespace(f"""
mount -t tmpfs -o size=1m,ro tmpfs {disk}
alps {home}/readonly {_args(*prune_args(fault_model, disk / "out", home / "cache"))}
""", environment(home))
    code, stderr = _result(home, "readonly")
    assert code == 2, stderr
    assert "read-only" in stderr and str(disk) in stderr and "Traceback" not in stderr
    assert not (home / "cache" / "blocks").exists(), "refused before any block was solved"
