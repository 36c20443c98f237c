"""How fast this machine runs what a pruning run spends its time on, measured in about a second.

Two rates set a block's time: float32 matrix products (the forwards, X^T X, the solvers' iterations, SparseGPT's
factorisations) and float64 symmetric eigendecompositions (ALPS's one per H). Both are timed on the run's
device with the run's thread count, on sizes big enough to reach the steady rate, and kept in a small JSON
file under the cache root (keyed by device, threads and torch version) so later plans do not time them again.
Rates can also be given, to plan for another machine (for example a GPU cluster from a laptop).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch

from ..common.files import atomic_write_json, cache_root

__all__ = ["MachineRates", "measure_rates"]

_MATMUL_SIZE = 1536  # float32 square product timed for the matmul rate
# float64 eigendecomposition timed for the eigh rate: at 1024 LAPACK is still far from its large-matrix rate
# (scaled as d^3, 1024 overstated a 5632-wide decomposition twice over on a 2-core CPU; 2048 is within 10%)
_EIGH_SIZE = 2048
_VERSION = 2  # of how the rates are measured: part of the cached file's name
EIGH_REFERENCE = 4096  # rates state the eigendecomposition's time at this size (scaled as d^3)


@dataclass(frozen=True)
class MachineRates:
    matmul_gflops: float  # float32 matrix products, multiply-adds counted as 2 flops
    eigh_seconds: float  # one float64 eigendecomposition of a EIGH_REFERENCE-wide symmetric matrix
    source: str  # where the figures come from: "measured on cpu, 2 threads" or "given"

    def eigh(self, d: int) -> float:
        """Seconds for one float64 eigendecomposition of width ``d``."""
        return self.eigh_seconds * (d / EIGH_REFERENCE) ** 3

    def matmul(self, flops: float) -> float:
        return flops / (self.matmul_gflops * 1e9)


def measure_rates(device: torch.device, threads: int | None = None, *, refresh: bool = False) -> MachineRates:
    """This machine's rates on ``device`` with ``threads`` torch threads (default: torch's current count),
    timed once and then read from the cache root."""
    threads = threads or torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    key = f"v{_VERSION}-{name}-{threads}-threads-torch-{torch.__version__}".replace(" ", "_").replace("/", "_")
    path = cache_root() / "rates" / f"{key}.json"
    if path.is_file() and not refresh:
        return MachineRates(**json.loads(path.read_text()))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rates = MachineRates(matmul_gflops=_matmul_gflops(device), eigh_seconds=_eigh_seconds(device),
                             source=f"measured on {name}, {threads} threads")
    finally:
        torch.set_num_threads(previous)
    atomic_write_json(path, asdict(rates))
    return rates


def _best_of(repeats: int, step, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def _matmul_gflops(device: torch.device) -> float:
    generator = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(_MATMUL_SIZE, _MATMUL_SIZE, generator=generator).to(device) for _ in range(2))
    a @ b  # warm-up: thread pools, kernels
    seconds = _best_of(3, lambda: a @ b, device)
    return 2 * _MATMUL_SIZE**3 / seconds / 1e9


def _eigh_seconds(device: torch.device) -> float:
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2 * _EIGH_SIZE, _EIGH_SIZE, generator=generator, dtype=torch.float64)
    h = (x.T @ x).to(device)
    torch.linalg.eigh(h[:64, :64])  # warm-up
    seconds = _best_of(2, lambda: torch.linalg.eigh(h), device)
    return seconds * (EIGH_REFERENCE / _EIGH_SIZE) ** 3


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
