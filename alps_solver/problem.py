"""One layer's pruning problem and its damped, diagonally scaled form.

Objective (ALPS, Meng et al. 2024, arXiv 2406.07831, eq. 1): with calibration inputs X (n_tokens, d_in)
and dense weights W (d_out, d_in),

    minimise  ||X (W_hat - W)^T||_F^2 = tr((W_hat - W) H (W_hat - W)^T),   H = X^T X,

subject to W_hat satisfying a sparsity pattern. Only H is needed, never X itself.

Dense targets (error correction): when X is the *pruned* model's input X_p, the layer can aim at the dense
model's output X_d W^T instead of its own, minimising ||X_p W_hat^T - X_d W^T||_F^2. That needs one more
matrix beside H = X_p^T X_p, the cross Gram K = X_p^T X_d, and reduces to the objective above: with the
target weights W* = W K^T H^-1 (W* H = W K^T, the unconstrained minimiser),

    ||X_p W_hat^T - X_d W^T||^2 = ||X_p (W_hat - W*)^T||^2 + constant,

so every method that reads H solves the reduced problem (W*, H) unchanged (``LayerProblem.reduced``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

import torch

__all__ = ["GramCache", "LayerProblem", "ScaledGram", "ScaledProblem", "gram_matrix", "gram_matrix_flops"]

T = TypeVar("T")
CROSS_RIDGE = 0.01  # lambda / mean(diag H) of the dense-target weights W* (LayerProblem.reduced)
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_GRAM_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class LayerProblem:
    """Dense weight W (d_out, d_in) and Gram matrix H = X^T X (d_in, d_in) of one linear layer.

    Optional statistics of the calibration inputs, used by some baselines: ``input_mean`` and
    ``input_var`` (d_in,) per input channel, and ``n_tokens`` (rows of X behind H). Optional ``cross``
    (d_in, d_in): K = X_p^T X_d, which makes the target the dense model's output (module docstring); solve
    ``reduced()`` then.
    """

    weight: torch.Tensor
    gram: torch.Tensor
    input_mean: torch.Tensor | None = None
    input_var: torch.Tensor | None = None
    n_tokens: int | None = None
    cross: torch.Tensor | None = None

    def __post_init__(self) -> None:
        W, H = self.weight, self.gram
        if not isinstance(W, torch.Tensor) or W.ndim != 2:
            raise ValueError(f"weight must be a 2-D tensor (d_out, d_in); got {_describe(W)}.")
        if W.dtype not in _WEIGHT_DTYPES:
            raise ValueError(f"weight dtype {W.dtype} is not supported; use one of {_names(_WEIGHT_DTYPES)}.")
        d_in = W.shape[1]
        if not isinstance(H, torch.Tensor) or tuple(H.shape) != (d_in, d_in):
            raise ValueError(
                f"gram must be the ({d_in}, {d_in}) matrix X^T X for a weight with d_in={d_in}; got {_describe(H)}."
            )
        if H.dtype not in _GRAM_DTYPES:
            raise ValueError(f"gram dtype {H.dtype} is not supported; accumulate it in float32 or float64.")
        if H.device != W.device:
            raise ValueError(f"gram is on {H.device} but weight is on {W.device}; put both on the same device.")
        if not bool(torch.isfinite(H).all()):
            raise ValueError("gram has non-finite entries (inf or nan); check the calibration inputs.")
        if not bool(torch.isfinite(W).all()):
            raise ValueError("weight has non-finite entries (inf or nan).")
        for name in ("input_mean", "input_var"):
            stat = getattr(self, name)
            if stat is None:
                continue
            if not isinstance(stat, torch.Tensor) or tuple(stat.shape) != (d_in,):
                raise ValueError(f"{name} must have shape ({d_in},); got {_describe(stat)}.")
            if stat.device != W.device:
                raise ValueError(f"{name} is on {stat.device} but weight is on {W.device}.")
        if self.n_tokens is not None and (not isinstance(self.n_tokens, int) or self.n_tokens < 1):
            raise ValueError(f"n_tokens must be a positive integer; got {self.n_tokens!r}.")
        K = self.cross
        if K is not None:
            if not isinstance(K, torch.Tensor) or tuple(K.shape) != (d_in, d_in):
                raise ValueError(f"cross must be the ({d_in}, {d_in}) matrix X_p^T X_d; got {_describe(K)}.")
            if K.dtype not in _GRAM_DTYPES or K.device != W.device:
                raise ValueError(f"cross must be float32 or float64 on {W.device}, like gram; got {_describe(K)} "
                                 f"on {K.device}.")
            if not bool(torch.isfinite(K).all()):
                raise ValueError("cross has non-finite entries (inf or nan); check the calibration inputs.")

    def reduced(self, ridge: float = CROSS_RIDGE) -> LayerProblem:
        """The problem without the cross term: target weights W* = W (K^T + lambda I) (H + lambda I)^-1 and the
        same H, so that ||X_p (W_hat - W*)^T||^2 is the dense-target objective up to a constant. Without
        ``cross``, the problem itself.

        The ridge lambda = ``ridge`` * mean(diag H) is the minimiser's of the objective plus
        lambda ||W_hat - W||^2: it keeps the solve defined when H is singular (fewer tokens than inputs, dead
        channels), and where the inputs say nothing it pulls W* toward W, not toward 0 (without a cross term,
        K = H, W* is exactly W).
        """
        if self.cross is None:
            return self
        H, K = self.gram.to(torch.float64), self.cross.to(torch.float64)
        mean_diagonal = float(H.diagonal().mean())
        lam = ridge * mean_diagonal if mean_diagonal > 0 else 1.0
        eye = torch.eye(self.d_in, dtype=torch.float64, device=H.device)
        W = self.weight.to(torch.float64)
        # (H + lambda I) W*^T = (K + lambda I) W^T, H + lambda I symmetric positive definite: one Cholesky solve.
        factor = torch.linalg.cholesky(H + lam * eye)
        target = torch.cholesky_solve((K + lam * eye) @ W.T, factor).T  # (d_out, d_in)
        return LayerProblem(weight=target.to(self.weight.dtype), gram=self.gram, input_mean=self.input_mean,
                            input_var=self.input_var, n_tokens=self.n_tokens)

    @classmethod
    def from_inputs(cls, weight: torch.Tensor, inputs: torch.Tensor) -> LayerProblem:
        """Build the problem from calibration inputs X (..., d_in), accumulating statistics in float64."""
        X = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)
        return cls(
            weight=weight,
            gram=gram_matrix(X),
            input_mean=X.mean(dim=0).to(weight.device),
            input_var=X.var(dim=0, unbiased=False).to(weight.device),
            n_tokens=X.shape[0],
        )

    @property
    def d_out(self) -> int:
        return self.weight.shape[0]

    @property
    def d_in(self) -> int:
        return self.weight.shape[1]

    @property
    def error_dtype(self) -> torch.dtype:
        """Precision of the error products: the weight's, at least float32 (a float64 product costs twice
        as much); the sums are always taken in float64. A float32 product is exact to about 1e-7 of
        ||X E^T||^2's scale |E|^2 |H|, so an error far below that (an E nearly in H's null space, when there
        are fewer tokens than inputs) reads as roughly zero, never below it."""
        return torch.promote_types(self.weight.dtype, torch.float32)

    def row_errors(self, weight_hat: torch.Tensor) -> torch.Tensor:
        """(d_out,) float64: ||X (w_hat_i - w_i)||^2 for every output row i, from the undamped H."""
        E = weight_hat.to(self.error_dtype) - self.weight.to(self.error_dtype)
        H = self.gram.to(self.error_dtype)  # a copy only when H is float64 and the weight is not: not kept
        return ((E @ H) * E).sum(dim=1, dtype=torch.float64).clamp_min(0.0)

    @cached_property
    def reference_error(self) -> float:
        """||X W^T||^2, the error of pruning everything: the denominator of ``rel_error`` (computed once)."""
        return max(float(self.row_errors(torch.zeros_like(self.weight)).sum()), torch.finfo(torch.float64).tiny)

    def rel_error(self, weight_hat: torch.Tensor) -> float:
        """||X (W_hat - W)^T||^2 / ||X W^T||^2 from the undamped H (0 for W_hat = W)."""
        return float(self.row_errors(weight_hat).sum()) / self.reference_error


@dataclass(frozen=True, eq=False)
class ScaledGram:
    """The damped, diagonally scaled Gram matrix: the part of the scaled problem that depends on H alone.

    With H_d = H + lambda I (lambda = damping * mean(diag H)) and s = sqrt(diag H_d), Hs = S^-1 H_d S^-1
    has a unit diagonal. The damping keeps Hs positive definite when there are fewer tokens than inputs;
    the unit diagonal makes one penalty rho meaningful for every layer, whatever the scale of its inputs.
    Layers that read the same input (q/k/v, gate/up) have the same ScaledGram (see ``GramCache``).
    """

    Hs: torch.Tensor  # (d_in, d_in) scaled, damped Gram matrix, compute dtype
    scale: torch.Tensor  # (d_in,) s = sqrt(diag(H_d)), compute dtype
    scale64: torch.Tensor  # (d_in,) the same s in float64, which the weights are scaled with
    damping: float  # lambda actually added to the diagonal

    @classmethod
    def build(cls, gram: torch.Tensor, damping: float, dtype: torch.dtype) -> ScaledGram:
        H = gram.to(torch.float64)
        mean_diagonal = float(H.diagonal().mean())
        # An all-zero H (a layer that never saw a non-zero input) makes any weights optimal; a unit ridge
        # keeps the algebra defined. Otherwise the ridge is exactly what was asked for, 0 included.
        lam = damping * mean_diagonal if mean_diagonal > 0 else 1.0
        Hd = H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        s = Hd.diagonal().sqrt()
        s = torch.where(s > 0, s, torch.ones_like(s))  # dead inputs without damping: leave them unscaled
        Hs = Hd / s[:, None] / s[None, :]
        return cls(Hs=Hs.to(dtype), scale=s.to(dtype), scale64=s, damping=lam)

    @cached_property
    def eigen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Hs = Q diag(L) Q^T: (L (d_in,), Q (d_in, d_in)) in Hs's dtype, computed once, on first use.

        The decomposition runs in float64: the small eigenvalues of a damped Gram matrix decide the ADMM
        weight step's accuracy, and float32 loses them. L is clamped at 0 (rounding can make it slightly
        negative for a singular H without damping).
        """
        L, Q = torch.linalg.eigh(self.Hs.to(torch.float64))
        return L.clamp_min(0.0).to(self.Hs.dtype), Q.to(self.Hs.dtype)


class GramCache:
    """Work that depends on H alone, shared by the solves of layers that read the same input.

    q/k/v and gate/up each share one H, so they can share what a method derives from it: ALPS's scaled H
    and its float64 eigendecomposition (a d_in^3 step it would otherwise repeat for every member),
    SparseGPT's factor of H^-1. Pass one cache to the ``solve`` of each member of such a group, one after
    another. A value is reused only for an H with the very values, dtype and device it was derived from
    (and the same key, which names the method's settings), so a cache handed to unrelated problems costs
    an equality check, never a wrong answer. An H modified in place after it was cached is caught by
    torch's version counter, which tensors made under ``torch.inference_mode`` lack: do not modify those
    while a cache holds them. Only the latest H's values are kept, so memory stays one layer's worth.
    """

    def __init__(self) -> None:
        self._gram: torch.Tensor | None = None
        self._version: int | None = None
        self._values: dict[Hashable, Any] = {}

    def get(self, gram: torch.Tensor, key: Hashable, build: Callable[[], T]) -> T:
        """The value ``build()`` derived from this H under ``key``: cached, or built now and kept."""
        if not self._holds(gram):
            self._gram, self._version, self._values = gram, _version(gram), {}
        if key not in self._values:
            self._values[key] = build()
        return self._values[key]

    def _holds(self, gram: torch.Tensor) -> bool:
        cached = self._gram
        if cached is None or _version(cached) != self._version:  # modified in place since it was cached
            return False
        if cached is gram:
            return True
        return (cached.shape == gram.shape and cached.dtype == gram.dtype and cached.device == gram.device
                and bool(torch.equal(cached, gram)))


@dataclass(frozen=True, eq=False)
class ScaledProblem:
    """The damped problem in diagonally scaled variables, as ALPS and its ADMM relatives solve it.

    The change of variables B = W diag(s) (``ScaledGram``) turns the objective into
    tr((B - B0) Hs (B - B0)^T) with Hs's diagonal 1. Scaling columns does not move zeros, so a pattern on
    B is the same pattern on W.
    """

    scaled_gram: ScaledGram  # Hs, s and lambda (and the eigendecomposition): shared by problems with one H
    B0: torch.Tensor  # (d_out, d_in) scaled dense weights, compute dtype

    @classmethod
    def build(cls, problem: LayerProblem, damping: float, dtype: torch.dtype,
              cache: GramCache | None = None) -> ScaledProblem:
        scaled_gram = (cache or GramCache()).get(problem.gram, ("scaled-gram", damping, dtype),
                                                 lambda: ScaledGram.build(problem.gram, damping, dtype))
        B0 = problem.weight.to(torch.float64) * scaled_gram.scale64[None, :]
        return cls(scaled_gram=scaled_gram, B0=B0.to(dtype))

    @property
    def Hs(self) -> torch.Tensor:
        return self.scaled_gram.Hs

    @property
    def scale(self) -> torch.Tensor:
        return self.scaled_gram.scale

    @property
    def damping(self) -> float:
        return self.scaled_gram.damping

    @cached_property
    def B0Hs(self) -> torch.Tensor:
        """(d_out, d_in) B0 Hs: the constant term of the ADMM weight step and the backsolve's right-hand
        sides (row i is (Hs b0_i)^T); computed once per problem."""
        return self.B0 @ self.Hs

    def unscale(self, B: torch.Tensor) -> torch.Tensor:
        """Back from scaled variables B to weights W = B diag(s)^-1."""
        return B / self.scale[None, :]


_GRAM_PANEL = 384  # columns per panel of gram_matrix (fastest of 192-768 on CPU for d = 576-1536)


def gram_matrix(X: torch.Tensor) -> torch.Tensor:
    """X^T X (d, d) for X (n, d), in X's dtype.

    Only the panels on and above the diagonal are multiplied, the rest mirrored: about (p + 1) / 2p of the
    full product's work for p panels (measured 20-28% faster than ``X.T @ X`` at d = 1536 on CPU).
    """
    d = X.shape[1]
    edges = _panel_edges(d)
    if len(edges) == 2:
        return X.T @ X
    G = torch.empty(d, d, dtype=X.dtype, device=X.device)
    for start, stop in zip(edges, edges[1:]):
        rows = X[:, start:stop].T @ X[:, start:]  # (stop - start, d - start): panel rows, diagonal onwards
        G[start:stop, start:] = rows
        G[stop:, start:stop] = rows[:, stop - start :].T
    return G


def gram_matrix_flops(n: int, d: int) -> float:
    """Multiply-add FLOPs ``gram_matrix`` spends on an (n, d) input."""
    edges = _panel_edges(d)
    return sum(2.0 * n * (stop - start) * (d - start) for start, stop in zip(edges, edges[1:]))


def _panel_edges(d: int) -> list[int]:
    panels = max(1, round(d / _GRAM_PANEL))
    return [round(i * d / panels) for i in range(panels + 1)]


def _version(tensor: torch.Tensor) -> int | None:
    """torch's count of in-place changes to ``tensor``; None for inference tensors, which keep none."""
    if tensor.is_inference():
        return None
    return tensor._version


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__}"


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)
