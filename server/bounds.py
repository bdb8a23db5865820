"""What bounds one device's influence on the shared base, whatever it sends (docs/wire.md).

One bound for both paths: every aggregated element lies in ``[-C, C]`` with ``C`` the
clipping range (``RunConfig.secagg_clipping_range``) and every weight in ``[1, max-weight]``.

- **Without secure aggregation** the server sees each delta: types and shapes are checked
  (``shared.wire.check_update``), the weight is capped and every element clipped to ``±C``
  here, so the weighted mean stays in ``[-C, C]`` whatever one device sends.
- **With SecAgg+** the server sees only the unmasked aggregate. Each device declares its
  weight in plaintext (``num_examples``), which must be an integer in ``[1, max-weight]``.
  From the aggregate and the declared total weight the server recovers the integer sums of
  the quantized elements: they must be integers (a weight encoded in the masked vector
  other than the one declared breaks that) within ``[0, n·Q]`` (what ``n`` devices within
  the clipping range can sum to), and the mean must lie in ``[-C, C]`` up to the
  quantization error. Otherwise the round is refused: the base is not updated and no
  checkpoint is written. Within those bounds a malicious device can still bias a round (no
  per-device range proofs in SecAgg+): bounded, not eliminated.
"""

from __future__ import annotations

import numpy as np


class OutOfBoundsError(ValueError):
    """An update or aggregate outside what the server accepts: rejected (or the round refused)."""


def check_weight(num_examples: object, max_weight: float) -> int:
    """The declared weight as an int in ``[1, max_weight]``; ``OutOfBoundsError`` otherwise."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)):
        raise OutOfBoundsError(f"num_examples {num_examples!r} is not an integer")
    if not 1 <= int(num_examples) <= max_weight:
        raise OutOfBoundsError(f"num_examples {num_examples} outside [1, max-weight {max_weight:g}]")
    return int(num_examples)


def cap_weight(num_examples: int, max_weight: float) -> float:
    """A plain-path weight: at most ``max_weight`` (one device never outweighs that)."""
    return float(min(num_examples, max_weight))


def clip_elements(delta: list[np.ndarray], bound: float) -> list[np.ndarray]:
    """Every element of ``delta`` clipped to ``[-bound, bound]`` (dtype kept)."""
    return [np.clip(d, -bound, bound).astype(d.dtype) for d in delta]


def quantized_weight(num_examples: int, *, max_weight: float, quantization_range: int) -> int:
    """The weight level a device running Flower's ``secaggplus_mod`` encodes for ``num_examples``."""
    return round(num_examples / max_weight * quantization_range)


def check_secure_aggregate(mean: list[np.ndarray], *, weights: list[int], clipping_range: float,
                           quantization_range: int, max_weight: float, modulus_range: int = 2**32) -> None:
    """Raise ``OutOfBoundsError`` unless ``mean`` (SecAgg+'s unmasked weighted mean) is an
    aggregate that ``len(weights)`` devices with these declared weights could produce.

    Flower computes ``mean = (S·2C/Q − n·C) · Q/T`` from the integer sums ``S`` of the
    quantized elements and the total weight level ``T`` encoded in the masked vectors. With
    ``T`` recomputed from the declared weights, ``S`` must come back as integers in
    ``[0, n·Q]``; and ``|mean| ≤ C·(1 + 2n/T)`` (each honest element within ``±C`` plus one
    quantization level of rounding).
    """
    n, q, c = len(weights), quantization_range, clipping_range
    if n == 0:
        raise OutOfBoundsError("an aggregate of no devices")
    if n * q >= modulus_range:
        raise OutOfBoundsError(f"{n} devices × {q} levels reach the modulus {modulus_range}: sums would wrap")
    total = sum(quantized_weight(w, max_weight=max_weight, quantization_range=q) for w in weights)
    if total <= 0:
        raise OutOfBoundsError(f"declared weights {weights} quantize to a total of {total}")
    box = c * (1.0 + 2.0 * n / total)
    tolerance = 1e-4 + 1e-14 * n * q  # float64 round-off of Flower's dequantization, in levels
    for i, arr in enumerate(mean):
        a = np.asarray(arr, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            raise OutOfBoundsError(f"aggregate array {i} has non-finite values (a weight level of 0?)")
        worst = float(np.abs(a).max(initial=0.0))
        if worst > box:
            raise OutOfBoundsError(f"aggregate array {i}: |mean| reaches {worst:.3g} > bound {box:.3g} (C = {c:g})")
        sums = a * total / (2.0 * c) + n * q / 2.0
        off = float(np.abs(sums - np.round(sums)).max(initial=0.0))
        if off > tolerance:
            raise OutOfBoundsError(f"aggregate array {i} is inconsistent with the declared weights "
                                   f"(quantized sums off the integers by {off:.3g})")
        if float(sums.min(initial=0.0)) < -tolerance or float(sums.max(initial=0.0)) > n * q + tolerance:
            raise OutOfBoundsError(f"aggregate array {i}: quantized sums outside [0, n·Q] = [0, {n * q}]")
