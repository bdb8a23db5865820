"""A device's final evaluation on its held-out records (never trained on).

What the device has (every run): ``base`` (no adapter), ``shared`` (the final shared base,
the personal part at its initialization) and ``personal`` (the final shared base with the
personal part the device stored). A deployed device evaluates only this by default
(``evaluation = "auto"``): nothing is trained.

Four-way (simulations and benchmarks; ``evaluation = "four-way"``): ``personal`` is the
personal part re-fitted to the final shared base (``Device.personalize``), and ``local``
is a local-only baseline trained from scratch on the device's own records, the same
schedule for as many rounds as the device trained, never averaged — what federation is
compared against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedpgen.shared.accelerator import precision
from fedpgen.shared.adapters import active, set_arrays, set_tensors
from fedpgen.shared.presets import PERSONAL, PERSONALIZE, SHARED
from fedpgen.shared.privacy.mechanism import NoPrivacy

if TYPE_CHECKING:
    from fedpgen.client.device import Device

REPORT = "report.png"


def final_evaluation(device: Device, shared: list[np.ndarray], *, four_way: bool) -> dict[str, object]:
    """The evaluation reply's metrics (``shared/wire.py``: ``<variant>-<metric>``)."""
    held = device.data.heldout
    out: dict[str, object] = {"client-index": device.client_index, "num-heldout": int(held.shape[0]),
                              **device.skipped()}
    parts: dict[str, object] = {}

    def record(variant: str, adapters: list[str] | None) -> None:
        memory = device.data.memory if adapters is not None and PERSONAL in adapters else None  # the user's own
        with precision(device.device, device.dtype):
            if adapters is None:
                with device.model.disable_adapter():
                    scores, parts[variant] = device.task.evaluate(device.model, held)
            else:
                with active(device.model, adapters, ()):
                    scores, parts[variant] = device.task.evaluate(device.model, held, memory)
        out.update({f"{variant}-{k}": v for k, v in scores.items()})

    record("base", None)
    set_arrays(device.model, device.sets.send, shared)
    set_tensors(device.model, device.init_keep)
    record("shared", [SHARED])
    if four_way:
        device.personalize(device.generator("personalize", 0))
    else:
        device.load_personal()
    record("personal", [SHARED, PERSONAL])
    if four_way:
        _local_only(device)
        record("local", [SHARED, PERSONAL])
    png = device.task.render_report(parts, held)
    if png is not None:  # e.g. sample grids: personal data, kept sealed on the device
        device.store.write(REPORT, png)
    return out


def _local_only(device: Device) -> None:
    """Train the local-only baseline into the device's model: from the initial shared and
    personal parts, the preset's schedule without DP for as many rounds as the device trained."""
    set_arrays(device.model, device.sets.send, device.init_send)
    set_tensors(device.model, device.init_keep)
    for r in range(max(1, int(device.store.load_meta().get("rounds_trained", 0)))):
        device.train_round(device.generator("local", r))
    if device.sets.personal_trainable:
        # the same final fit as shared+personal's (personal-folds included)
        device.run_phase(PERSONALIZE, device.generator("local-personalize", 0), NoPrivacy(), final=True)
