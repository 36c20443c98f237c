"""Sparsity patterns: one vocabulary for code, CLI and YAML, with projection and checking written once.

A pattern describes which entries of a weight matrix W of shape (d_out, d_in) may be non-zero:

- ``unstructured(s)``: a fraction ``s`` of all entries of the layer is zero.
- ``per_row(s)``: every output row has the same fraction ``s`` of zeros.
- ``n_m(n, m)``: in every group of ``m`` consecutive inputs of a row, ``n`` entries are kept.
- ``input_channels(s)`` (written ``channels:s``): a fraction ``s`` of whole input columns is zero.
- ``channel_groups(n, m, size)`` (written ``channels:n:mxsize``): the input columns form groups of ``size``
  consecutive columns (an attention head's slice of an output projection), and in every ``m`` consecutive
  groups ``n`` are kept whole, the others are zero (``channels:2:3x64``: 2 of every 3 heads of 64).

Text form (``SparsityPattern.parse`` and ``str(pattern)``): ``"0.7"``, ``"rows:0.7"``, ``"2:4"``,
``"channels:0.5"``, ``"channels:2:3x64"``; the spelled-out forms ``"unstructured(0.7)"``, ``"per_row(0.7)"``,
``"n_m(2, 4)"``, ``"input_channels(0.5)"`` and ``"channel_groups(2, 3, 64)"`` parse too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

import torch

__all__ = ["PatternKind", "SparsityPattern"]


class PatternKind(str, Enum):
    UNSTRUCTURED = "unstructured"
    PER_ROW = "per_row"
    N_M = "n_m"
    INPUT_CHANNELS = "input_channels"
    CHANNEL_GROUPS = "channel_groups"


_FRACTION_KINDS = (PatternKind.UNSTRUCTURED, PatternKind.PER_ROW, PatternKind.INPUT_CHANNELS)
_PREFIXES = {
    "rows": PatternKind.PER_ROW,
    "per_row": PatternKind.PER_ROW,
    "channels": PatternKind.INPUT_CHANNELS,
    "input_channels": PatternKind.INPUT_CHANNELS,
    "unstructured": PatternKind.UNSTRUCTURED,
}
_CALL = re.compile(r"^\s*(\w+)\s*\(\s*([^)]*)\)\s*$")
_GROUPS = re.compile(r"^(\d+):(\d+)x(\d+)$")  # the tail of channels:n:mxsize


@dataclass(frozen=True)
class SparsityPattern:
    """Which entries of a (d_out, d_in) weight may stay non-zero. Build with the class methods."""

    kind: PatternKind
    sparsity: float = 0.0
    n: int = 0
    m: int = 0
    size: int = 1  # columns per group (channel_groups)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", PatternKind(self.kind))
        if self.kind in _FRACTION_KINDS:
            if not isinstance(self.sparsity, (int, float)) or not 0.0 <= float(self.sparsity) < 1.0:
                raise ValueError(
                    f"sparsity={self.sparsity!r} is out of range: it is the fraction of weights removed "
                    "and must be in [0, 1) (e.g. 0.7 removes 70%)."
                )
            object.__setattr__(self, "sparsity", float(self.sparsity))
        elif self.kind is PatternKind.CHANNEL_GROUPS:
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.n, self.m, self.size)):
                raise ValueError(f"pattern channels:{self.n!r}:{self.m!r}x{self.size!r}: the counts must be whole "
                                 "numbers (e.g. channels:2:3x64).")
            if self.size < 1 or not 1 <= self.n < self.m:
                raise ValueError(f"pattern channels:{self.n}:{self.m}x{self.size}: keep n of every m groups of "
                                 "size columns needs 1 <= n < m and size >= 1 (e.g. channels:2:3x64).")
            object.__setattr__(self, "sparsity", 1.0 - self.n / self.m)
        else:
            if not (isinstance(self.n, int) and isinstance(self.m, int)) or isinstance(self.n, bool):
                raise ValueError(f"pattern {self.n!r}:{self.m!r}: N and M must be whole numbers (e.g. 2:4).")
            if self.m < 2:
                raise ValueError(f"pattern {self.n}:{self.m}: M (group size) must be at least 2 (e.g. 2:4 or 4:8).")
            if self.n < 1:
                raise ValueError(f"pattern {self.n}:{self.m}: N (kept) must be at least 1 (0 would keep no weight). "
                                 "Use e.g. 2:4 or 4:8.")
            if self.n >= self.m:
                consequence = ("keeps every weight, so nothing would be pruned" if self.n == self.m
                               else f"cannot keep {self.n} of every {self.m}")
                raise ValueError(f"pattern {self.n}:{self.m}: N (kept) must be smaller than M (group size); "
                                 f"{self.n}:{self.m} {consequence}. Use e.g. 2:4 or 4:8.")
            object.__setattr__(self, "sparsity", 1.0 - self.n / self.m)

    # ----------------------------------------------------------------------------------- constructors
    @classmethod
    def unstructured(cls, sparsity: float) -> SparsityPattern:
        return cls(PatternKind.UNSTRUCTURED, sparsity=sparsity)

    @classmethod
    def per_row(cls, sparsity: float) -> SparsityPattern:
        return cls(PatternKind.PER_ROW, sparsity=sparsity)

    @classmethod
    def n_m(cls, n: int, m: int) -> SparsityPattern:
        return cls(PatternKind.N_M, n=n, m=m)

    @classmethod
    def input_channels(cls, sparsity: float) -> SparsityPattern:
        return cls(PatternKind.INPUT_CHANNELS, sparsity=sparsity)

    @classmethod
    def channel_groups(cls, n: int, m: int, size: int) -> SparsityPattern:
        return cls(PatternKind.CHANNEL_GROUPS, n=n, m=m, size=size)

    @property
    def by_column(self) -> bool:
        """Whether the pattern keeps or removes whole input columns: ``select`` then sums each column's scores
        (pass squared values for the Euclidean group projection)."""
        return self.kind in (PatternKind.INPUT_CHANNELS, PatternKind.CHANNEL_GROUPS)

    @classmethod
    def parse(cls, text: str | float | SparsityPattern) -> SparsityPattern:
        """Parse ``"0.7"``, ``"rows:0.7"``, ``"2:4"``, ``"channels:0.5"`` or the spelled-out forms."""
        if isinstance(text, SparsityPattern):
            return text
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            return cls.unstructured(float(text))
        raw = str(text).strip()
        call = _CALL.match(raw)
        try:
            if call:
                name, args = call.group(1), [a.strip() for a in call.group(2).split(",") if a.strip()]
                if name == "n_m" and len(args) == 2:
                    return cls.n_m(int(args[0]), int(args[1]))
                if name == "channel_groups" and len(args) == 3:
                    return cls.channel_groups(int(args[0]), int(args[1]), int(args[2]))
                if name in _PREFIXES and len(args) == 1:
                    return cls(_PREFIXES[name], sparsity=float(args[0]))
            elif ":" in raw:
                head, tail = (part.strip() for part in raw.split(":", 1))
                groups = _GROUPS.match(tail.replace(" ", ""))
                if head.lower() in ("channels", "input_channels") and groups:
                    return cls.channel_groups(*(int(v) for v in groups.groups()))
                if head.lower() in _PREFIXES:
                    return cls(_PREFIXES[head.lower()], sparsity=float(tail))
                return cls.n_m(int(head), int(tail))
            else:
                return cls.unstructured(float(raw))
        except ValueError as err:
            if "could not convert" not in str(err) and "invalid literal" not in str(err):
                raise
        raise ValueError(
            f"pattern {raw!r} is not understood. Use a fraction for unstructured sparsity ('0.7'), "
            "'N:M' for N kept in every M ('2:4'), 'rows:0.7' for the same sparsity in every row, or "
            "'channels:0.5' to remove whole input channels ('channels:2:3x64': keep 2 of every 3 groups of 64)."
        )

    def __str__(self) -> str:
        if self.kind is PatternKind.N_M:
            return f"{self.n}:{self.m}"
        if self.kind is PatternKind.CHANNEL_GROUPS:
            return f"channels:{self.n}:{self.m}x{self.size}"
        prefix = {PatternKind.UNSTRUCTURED: "", PatternKind.PER_ROW: "rows:", PatternKind.INPUT_CHANNELS: "channels:"}
        # The shortest text that parses back to the same float: an allocated sparsity (a whole number of weights
        # over the layer's size) survives the round trip through files and task parameters exactly.
        return f"{prefix[self.kind]}{self.sparsity!r}"

    # ----------------------------------------------------------------------------------- shape logic
    def validate_shape(self, d_out: int, d_in: int) -> None:
        """Raise ValueError if a (d_out, d_in) weight cannot carry this pattern."""
        if d_out < 1 or d_in < 1:
            raise ValueError(f"weight shape ({d_out}, {d_in}) is empty; a layer needs at least one row and column.")
        if self.kind is PatternKind.N_M and d_in % self.m:
            raise ValueError(
                f"pattern {self}: d_in={d_in} is not divisible by M={self.m}, so the input dimension cannot be "
                f"split into groups of {self.m}. Use an M that divides {d_in}, or an unstructured pattern."
            )
        if self.kind is PatternKind.CHANNEL_GROUPS and d_in % (self.m * self.size):
            raise ValueError(
                f"pattern {self}: d_in={d_in} is not divisible by m x size = {self.m * self.size}, so the input "
                f"columns cannot be split into blocks of {self.m} groups of {self.size}."
            )

    def kept_count(self, d_out: int, d_in: int) -> int:
        """Number of entries kept (k in the paper) for a (d_out, d_in) weight."""
        self.validate_shape(d_out, d_in)
        if self.kind is PatternKind.UNSTRUCTURED:
            return int(round((1.0 - self.sparsity) * d_out * d_in))
        if self.kind is PatternKind.PER_ROW:
            return d_out * self._kept_per_row(d_in)
        if self.kind is PatternKind.N_M:
            return d_out * (d_in // self.m) * self.n
        if self.kind is PatternKind.CHANNEL_GROUPS:
            return d_out * (d_in // (self.m * self.size)) * self.n * self.size
        return d_out * self._kept_columns(d_in)

    def _kept_per_row(self, d_in: int) -> int:
        return int(round((1.0 - self.sparsity) * d_in))

    def _kept_columns(self, d_in: int) -> int:
        return d_in - int(round(self.sparsity * d_in))

    # ----------------------------------------------------------------------------------- projection
    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the entries to keep: the best the pattern allows for non-negative ``scores``.

        ``scores`` has the weight's shape (d_out, d_in); larger means more worth keeping. For
        ``input_channels`` a column's score is the sum of its entries' scores, for ``channel_groups`` a group's
        the sum over its columns (pass squared values to get the Euclidean group projection). Exactly
        ``kept_count`` entries are kept; among equal scores the choice is deterministic but unspecified.
        """
        d_out, d_in = scores.shape
        self.validate_shape(d_out, d_in)
        if self.kind is PatternKind.UNSTRUCTURED:
            return _largest_mask(scores.reshape(-1), self.kept_count(d_out, d_in)).reshape(d_out, d_in)
        if self.kind is PatternKind.PER_ROW:
            return _topk_mask(scores, self._kept_per_row(d_in))
        if self.kind is PatternKind.N_M:
            return _n_of_m_mask(scores.reshape(d_out, d_in // self.m, self.m), self.n).reshape(d_out, d_in)
        if self.kind is PatternKind.CHANNEL_GROUPS:
            groups = scores.sum(dim=0).reshape(-1, self.m, self.size).sum(dim=2)  # (blocks, m)
            kept = _topk_mask(groups, self.n).unsqueeze(-1).expand(-1, self.m, self.size).reshape(d_in)
            return kept.unsqueeze(0).expand(d_out, d_in).clone()
        columns = _topk_mask(scores.sum(dim=0), self._kept_columns(d_in))
        return columns.unsqueeze(0).expand(d_out, d_in).clone()

    def project(self, values: torch.Tensor) -> torch.Tensor:
        """Euclidean projection of ``values`` onto the pattern: keep the largest entries, zero the rest."""
        return values * self.select(values.square())

    def violations(self, mask: torch.Tensor) -> list[str]:
        """Why ``mask`` (True = kept) does not satisfy the pattern; an empty list when it does."""
        d_out, d_in = mask.shape
        self.validate_shape(d_out, d_in)
        kept = mask.bool()
        problems: list[str] = []
        if self.kind is PatternKind.UNSTRUCTURED:
            want = self.kept_count(d_out, d_in)
            if int(kept.sum()) > want:
                problems.append(f"{int(kept.sum())} entries kept, at most {want} allowed")
        elif self.kind is PatternKind.PER_ROW:
            want = self._kept_per_row(d_in)
            worst = int(kept.sum(dim=1).max())
            if worst > want:
                problems.append(f"a row keeps {worst} entries, at most {want} allowed")
        elif self.kind is PatternKind.N_M:
            worst = int(kept.reshape(d_out, d_in // self.m, self.m).sum(dim=2).max())
            if worst > self.n:
                problems.append(f"a group of {self.m} keeps {worst} entries, at most {self.n} allowed")
        elif self.kind is PatternKind.CHANNEL_GROUPS:
            used = kept.any(dim=0).reshape(-1, self.m, self.size).any(dim=2)  # (blocks, m): a group in use
            worst = int(used.sum(dim=1).max())
            if worst > self.n:
                problems.append(f"a block of {self.m} groups uses {worst}, at most {self.n} allowed")
        else:
            columns = kept.any(dim=0)
            want = self._kept_columns(d_in)
            if int(columns.sum()) > want:
                problems.append(f"{int(columns.sum())} input channels used, at most {want} allowed")
        return problems


def _topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest entries along the last dimension (exactly k; among equal scores top-k decides)."""
    size = scores.shape[-1]
    if k >= size:
        return torch.ones_like(scores, dtype=torch.bool)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    # topk's cost grows with k: when most entries are kept, find the few to drop instead.
    if k <= size // 2:
        index = torch.topk(scores, k, dim=-1, sorted=False).indices
        return mask.scatter_(-1, index, True)
    index = torch.topk(scores, size - k, dim=-1, largest=False, sorted=False).indices
    return mask.logical_not_().scatter_(-1, index, False)


# Projection runs once per ADMM iteration, and a plain top-k over a whole layer costs as much as the
# iteration's matrix product. The two helpers below find the same sets faster; both fall back to top-k
# when ties make the fast path ambiguous, so the result is always an exact top-k set.

_SAMPLE = 4096  # entries sampled to bracket the k-th largest score
_SAMPLE_STRIDE = 2654435761  # odd multiplier: sampled positions spread over every row and column
_BRACKET_SIGMAS = 4.0  # bracket half-width in standard deviations of the sampled quantile


def _largest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest entries of a 1-D tensor.

    A sample brackets the k-th largest score between two thresholds; the exact k-th largest is then
    found among the few scores between them, and everything at or above it is kept.
    """
    size = scores.numel()
    if size < 16 * _SAMPLE or not 0 < k < size:
        return _topk_mask(scores, k)
    positions = torch.arange(_SAMPLE, device=scores.device, dtype=torch.int64) * _SAMPLE_STRIDE % size
    sample = scores[positions].sort().values
    q = 1.0 - k / size  # the k-th largest is the q-quantile
    margin = _BRACKET_SIGMAS * (q * (1.0 - q) / _SAMPLE) ** 0.5 + 1.0 / _SAMPLE
    low = sample[max(int((q - margin) * (_SAMPLE - 1)), 0)]
    high = sample[min(int((q + margin) * (_SAMPLE - 1)) + 1, _SAMPLE - 1)]
    above = scores > high
    need = k - int(torch.count_nonzero(above))  # how many of the band (low, high] to keep
    if need == 0:
        return above
    band = scores[(scores > low).logical_and_(scores <= high)]
    if not 0 < need <= band.numel():  # the sample missed the k-th score
        return _topk_mask(scores, k)
    if band.is_cuda:  # CUDA's kthvalue selects with a single thread block per slice; its sort is parallel
        threshold = band.sort().values[band.numel() - need]
    else:
        threshold = torch.kthvalue(band, band.numel() - need + 1).values
    if int(torch.count_nonzero(band >= threshold)) != need:  # ties at the k-th score: let top-k choose
        return _topk_mask(scores, k)
    return scores >= threshold


def _n_of_m_mask(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Mask of the n largest of every group along the last dimension (size m) of ``groups``.

    Sorts the m columns with an odd-even transposition network of elementwise min/max, which for small
    m is several times faster than top-k over millions of tiny groups.
    """
    m = groups.shape[-1]
    if m > 16:  # the network costs m^2 / 2 passes
        return _topk_mask(groups, n)
    columns = list(groups.movedim(-1, 0).contiguous().unbind(0))
    for step in range(m):
        for i in range(step % 2, m - 1, 2):
            low, high = torch.minimum(columns[i], columns[i + 1]), torch.maximum(columns[i], columns[i + 1])
            columns[i], columns[i + 1] = low, high
    keep = groups >= columns[m - n].unsqueeze(-1)  # at least the n largest; more only on ties
    if bool((keep.sum(dim=-1) != n).any()):
        return _topk_mask(groups, n)
    return keep
