"""Random directions regenerated from seeds: never a ``(q, d)`` matrix.

A step of RGE needs ``q`` random directions ``u_1..u_q`` in R^d. Materializing them costs
``q·d`` numbers: 32 directions of an 11M-parameter network are 2.8 GB in float64, and a
124M-parameter transformer cannot take a step at all. Here a direction is a *seed*: any slice
``u_i[start:stop]`` is computed on demand, on the device of the array it is added to, from
``(seed, i, start..stop)`` alone. Perturbing, restoring and applying an update each
regenerate the slices they need, so an RGE step costs O(d) memory whatever q is (MeZO's
trick, Malladi et al. 2023), and a distributed step ships seeds and scalars, never vectors.

The scheme (counter-based, so any slice is computed without the ones before it)
--------------------------------------------------------------------------------
* Keys. Direction ``i`` of a step with 64-bit ``seed`` has two 32-bit keys
  ``(k0, k1)`` = the halves of ``splitmix64(seed ^ splitmix64(i + 1) ^ block·φ)``, where
  ``block = c >> 31`` for a word counter ``c`` (so counters stay below 2^31 inside a block,
  and d may exceed 2^32).
* Words. The 32-bit word with counter ``c`` is ``W(c) = h(h(c' ^ k0) ^ k1)`` with
  ``c' = c mod 2^31`` and ``h`` Wellons' ``lowbias32`` integer hash
  (``x ^= x>>16; x *= 0x7feb352d; x ^= x>>15; x *= 0x846ca68b; x ^= x>>16``, all mod 2^32).
* Gaussian entries (Box–Muller). Entries ``2p`` and ``2p+1`` share the word ``w = W(p)``:
  ``r = sqrt(-2 ln((w>>16 + ½)·2^-16))``, ``θ = 2π·(w & 0xFFFF)·2^-16``; entry ``2p`` is
  ``r cos θ``, entry ``2p+1`` is ``r sin θ``. Sixteen bits per uniform keep one hash per two
  entries (the generation is the cost of a large-model step on a CPU); the radius is then at
  most 4.85, so the tails beyond 4.85σ (probability 1.2e-6) are cut, which a random search
  direction does not notice.
* Rademacher entries. Entry ``j`` is ``+1`` if bit ``j mod 32`` of ``W(j >> 5)`` is set, else
  ``-1``.

The integer words are bit-identical on numpy, CuPy and torch (CPU and CUDA: torch computes in
int32 with wrapping products and masked shifts, which is the same arithmetic mod 2^32).
Rademacher directions are therefore bit-identical everywhere. Gaussian entries go through
``log``, ``sqrt``, ``cos`` and ``sin`` of the array library, which may differ in the last
unit of precision between libraries; on one library and device they are reproducible bit for
bit, which is all an exact restore or a resume needs (the same code regenerates them).
Entries are computed in the dtype of the array they are added to (float32 for float16 and
bfloat16 arrays, then cast).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ._array import Array, device_of, namespace

SeededDist = Literal["gaussian", "rademacher"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
#: words per key block: counters stay below 2^31 (non-negative in int32)
_BLOCK_WORDS = 1 << 31
#: ``0x846ca68b`` as a signed 32-bit number (torch computes words in int32)
_M2_SIGNED = 0x846CA68B - (1 << 32)


def splitmix64(z: int) -> int:
    """Vigna's SplitMix64 finalizer on a 64-bit integer (Python ints, exact)."""
    z = (z + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def check_seed(seed: Any) -> int:
    """``seed`` as an int in ``[0, 2^64)``; raises naming the bad value."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if not 0 <= int(seed) <= _MASK64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed!r}")
    return int(seed)


def draw_seed(rng: np.random.Generator) -> int:
    """One 63-bit step seed from ``rng`` (the only draw a seeded RGE step makes)."""
    return int(rng.integers(0, 2**63, dtype=np.int64))


def _keys(seed: int, index: int, block: int) -> tuple[int, int]:
    z = splitmix64(seed ^ splitmix64(index + 1) ^ ((block * _GOLDEN) & _MASK64))
    return z & 0xFFFFFFFF, z >> 32


# -- 32-bit words, one routine per kind of array library ------------------------------------
def _words_uint32(xp: Any, counters: Any, k0: int, k1: int) -> Any:
    """numpy / CuPy: uint32 arithmetic wraps mod 2^32."""
    x = counters ^ xp.uint32(k0)
    for k in (k1, None):
        x ^= x >> 16
        x *= xp.uint32(0x7FEB352D)
        x ^= x >> 15
        x *= xp.uint32(0x846CA68B)
        x ^= x >> 16
        if k is not None:
            x ^= xp.uint32(k)
    return x


def _words_int32(counters: Any, k0: int, k1: int) -> Any:
    """torch: int32 with wrapping products; ``>>`` is arithmetic, so shifts are masked."""
    s0 = k0 - (1 << 32) if k0 >= 1 << 31 else k0
    s1 = k1 - (1 << 32) if k1 >= 1 << 31 else k1
    x = counters ^ s0
    for k in (s1, None):
        x ^= (x >> 16) & 0xFFFF
        x *= 0x7FEB352D
        x ^= (x >> 15) & 0x1FFFF
        x *= _M2_SIGNED
        x ^= (x >> 16) & 0xFFFF
        if k is not None:
            x ^= k
    return x


def _is_torch(a: Any) -> bool:
    return type(a).__module__.startswith("torch")


@dataclass(frozen=True)
class SeededDirections:
    """``count`` random directions in R^``dim``, each regenerated from ``(seed, i)``.

    Args:
        seed: 64-bit step seed (see :func:`draw_seed`).
        count: number of directions m.
        dim: length d of each direction.
        dist: ``"gaussian"`` (N(0, I) entries) or ``"rademacher"`` (±1 entries).

    Memory: every method works on slices; ``chunk`` returns ``(stop - start,)`` numbers.
    Cost: generating one entry is a few integer hashes (plus Box–Muller for Gaussians); a
    direction costs O(d) time and O(chunk) memory.
    """

    seed: int
    count: int
    dim: int
    dist: SeededDist = "gaussian"

    def __post_init__(self) -> None:
        object.__setattr__(self, "seed", check_seed(self.seed))
        for name in ("count", "dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.dist not in ("gaussian", "rademacher"):
            raise ValueError(f"dist must be 'gaussian' or 'rademacher', got {self.dist!r}")

    # -- slices --------------------------------------------------------------------------
    def chunk(self, i: int, start: int, stop: int, like: Array) -> Array:
        """``u_i[start:stop]`` as a 1-D array of ``like``'s library, device and dtype."""
        if not 0 <= i < self.count:
            raise IndexError(f"direction {i} out of range for count={self.count}")
        if not 0 <= start <= stop <= self.dim:
            raise IndexError(f"slice [{start}, {stop}) out of range for dim={self.dim}")
        xp = namespace(like)
        out_dtype = like.dtype
        if start == stop:
            return xp.zeros((0,), dtype=out_dtype, device=device_of(like))
        compute = _compute_dtype(xp, out_dtype)
        if self.dist == "gaussian":
            vals = self._gaussian(xp, i, start, stop, like, compute)
        else:
            vals = self._rademacher(xp, i, start, stop, like, compute)
        return vals if vals.dtype == out_dtype else xp.astype(vals, out_dtype)

    def _words(self, xp: Any, i: int, first: int, n: int, like: Array) -> Any:
        """Words ``W(first) .. W(first + n - 1)`` of direction ``i`` (split at key blocks)."""
        torch_like = _is_torch(like)
        dev = device_of(like)
        parts = []
        c = first
        end = first + n
        while c < end:
            block = c // _BLOCK_WORDS
            stop = min(end, (block + 1) * _BLOCK_WORDS)
            k0, k1 = _keys(self.seed, i, block)
            lo, hi = c - block * _BLOCK_WORDS, stop - block * _BLOCK_WORDS
            if torch_like:
                import torch

                counters = torch.arange(lo, hi, dtype=torch.int32, device=dev)
                parts.append(_words_int32(counters, k0, k1))
            else:
                counters = xp.arange(lo, hi, dtype=xp.uint32, device=dev)
                parts.append(_words_uint32(xp, counters, k0, k1))
            c = stop
        return parts[0] if len(parts) == 1 else xp.concat(parts)

    def _gaussian(self, xp: Any, i: int, start: int, stop: int, like: Array, dt: Any) -> Array:
        p0, p1 = start // 2, (stop + 1) // 2  # the pairs that cover [start, stop)
        n = p1 - p0
        w = self._words(xp, i, p0, n, like)
        if _is_torch(like):
            import torch

            hi = ((w >> 16) & 0xFFFF).to(dt)
            lo = (w & 0xFFFF).to(dt)
            r = hi.add_(0.5).mul_(2.0**-16).log_().mul_(-2.0).sqrt_()
            theta = lo.mul_(2.0 * math.pi * 2.0**-16)
            pairs = torch.empty((n, 2), dtype=dt, device=w.device)
            torch.cos(theta, out=pairs[:, 0])
            torch.sin(theta, out=pairs[:, 1])
            pairs.mul_(r[:, None])
        else:
            r = xp.sqrt(-2.0 * xp.log((xp.astype(w >> 16, dt) + 0.5) * (2.0**-16)))
            theta = xp.astype(w & xp.uint32(0xFFFF), dt) * (2.0 * math.pi * 2.0**-16)
            pairs = xp.stack([r * xp.cos(theta), r * xp.sin(theta)], axis=1)
        flat = xp.reshape(pairs, (2 * n,))
        off = start - 2 * p0
        return flat[off : off + (stop - start)]

    def _rademacher(self, xp: Any, i: int, start: int, stop: int, like: Array, dt: Any) -> Array:
        w0, w1 = start >> 5, ((stop - 1) >> 5) + 1
        words = self._words(xp, i, w0, w1 - w0, like)
        if _is_torch(like):
            import torch

            shifts = torch.arange(32, dtype=torch.int32, device=words.device)
            bits = ((words[:, None] >> shifts) & 1).to(dt)
        else:
            shifts = xp.arange(32, dtype=xp.uint32, device=device_of(like))
            bits = xp.astype((words[:, None] >> shifts) & xp.uint32(1), dt)
        flat = xp.reshape(bits, (-1,))
        off = start - 32 * w0
        return flat[off : off + (stop - start)] * 2.0 - 1.0

    # -- whole directions, in chunks --------------------------------------------------------
    def norms(self, like: Array, chunk: int | None = None) -> np.ndarray:
        """``‖u_i‖₂`` for every direction, float64 on the host (one generation pass each;
        Rademacher directions have norm √d exactly and cost nothing)."""
        if self.dist == "rademacher":
            return np.full(self.count, math.sqrt(self.dim))
        xp = namespace(like)
        step = chunk or chunk_length(like)
        out = np.empty(self.count)
        for i in range(self.count):
            total = 0.0
            for s in range(0, self.dim, step):
                u = self.chunk(i, s, min(s + step, self.dim), like)
                total += float(xp.sum(xp.astype(u, _wide(xp)) ** 2))
            out[i] = math.sqrt(total)
        return out

    def combine(self, coef: Any, start: int, stop: int, like: Array) -> Array:
        """``Σ_i coef[i] · u_i[start:stop]`` (summed in order i = 0, 1, ...), ``like``'s dtype.

        ``coef``: ``(count,)`` host numbers; zero coefficients are skipped.
        """
        xp = namespace(like)
        coef = np.asarray(coef, dtype=np.float64)
        if coef.shape != (self.count,):
            raise ValueError(f"expected {self.count} coefficients, got shape {coef.shape}")
        out = xp.zeros((stop - start,), dtype=like.dtype, device=device_of(like))
        for i in np.flatnonzero(coef):
            out += float(coef[i]) * self.chunk(int(i), start, stop, like)
        return out

    def dense(self, i: int, like: Array) -> Array:
        """The whole direction ``u_i`` as a ``(dim,)`` array (tests, small problems)."""
        return self.chunk(i, 0, self.dim, like)


def _wide(xp: Any) -> Any:
    return xp.float64


def _compute_dtype(xp: Any, dtype: Any) -> Any:
    """float64 and float32 compute in themselves; narrower floats compute in float32."""
    if dtype == xp.float64 or dtype == xp.float32:
        return dtype
    return xp.float32


def chunk_length(like: Array) -> int:
    """Entries regenerated at a time: cache-sized on a CPU, large on an accelerator."""
    dev = device_of(like)
    on_cpu = (
        isinstance(like, np.ndarray) or str(dev) == "cpu" or getattr(dev, "type", None) == "cpu"
    )
    return 1 << 16 if on_cpu else 1 << 22


@dataclass(frozen=True)
class DirectionCombination:
    """A lazily evaluated ``g = Σ_i coef[i]·u_i`` (an RGE gradient that is never a matrix).

    ``chunk(start, stop)`` regenerates ``g[start:stop]`` (``coef`` costs m generations of the
    slice); ``dense()`` builds the whole ``(dim,)`` vector chunk by chunk (O(d) memory).
    ``like``: an array whose library, device and dtype the slices take.
    """

    directions: SeededDirections
    coef: np.ndarray
    like: Array

    @property
    def shape(self) -> tuple[int]:
        return (self.directions.dim,)

    def chunk(self, start: int, stop: int) -> Array:
        return self.directions.combine(self.coef, start, stop, self.like)

    def dense(self) -> Array:
        xp = namespace(self.like)
        d = self.directions.dim
        step = chunk_length(self.like)
        out = xp.empty((d,), dtype=self.like.dtype, device=device_of(self.like))
        for s in range(0, d, step):
            e = min(s + step, d)
            out[s:e] = self.chunk(s, e)
        return out


@dataclass(frozen=True)
class DirectionSteps:
    """The perturbed points of a seeded plan: row r is ``x + steps[r] · u_{index[r]}``.

    What an oracle with an in-place fast path (``eval_direction_steps``) needs instead of
    the points: O(rows) numbers, whatever d is.
    """

    directions: SeededDirections
    index: np.ndarray  # (rows,) int64
    steps: np.ndarray  # (rows,) float64

    def __post_init__(self) -> None:
        if self.index.shape != self.steps.shape or self.index.ndim != 1:
            raise ValueError(
                f"index and steps must be 1-D of one length, got {self.index.shape} "
                f"and {self.steps.shape}"
            )

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def rows(self, start: int, stop: int) -> DirectionSteps:
        return DirectionSteps(self.directions, self.index[start:stop], self.steps[start:stop])

    def points(self, x: Array) -> Array:
        """The ``(rows, d)`` points, built slice by slice (O(rows·d) memory: the caller's
        chunking bounds it)."""
        xp = namespace(x)
        d = x.shape[0]
        out = xp.empty((len(self), d), dtype=x.dtype, device=device_of(x))
        step = chunk_length(x)
        for r in range(len(self)):
            i, h = int(self.index[r]), float(self.steps[r])
            for s in range(0, d, step):
                e = min(s + step, d)
                out[r, s:e] = x[s:e] + h * self.directions.chunk(i, s, e, x)
        return out


def split_chunks(
    extents: list[tuple[int, int]], dim: int, chunk: int
) -> Iterator[tuple[int, int, list[tuple[int, int, int]]]]:
    """The flat range ``[0, dim)`` in chunks of ``chunk`` entries, each as
    ``(start, stop, [(k, a, b), ...])``: the part of the chunk that lies in segment ``k``
    (``extents[k] = (flat start, length)``, in flat order, covering ``[0, dim)``) is its local
    slice ``[a, b)``. A lazy gradient or a direction is regenerated once per chunk, however
    many small tensors the chunk spans."""
    k = 0
    for s in range(0, dim, chunk):
        e = min(s + chunk, dim)
        pieces = []
        while k < len(extents):
            start, length = extents[k]
            lo, hi = max(s, start), min(e, start + length)
            if lo < hi:
                pieces.append((k, lo - start, hi - start))
            if start + length > e:
                break
            k += 1
        yield s, e, pieces
