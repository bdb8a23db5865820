"""The device side of SecAgg+: Flower's ``secaggplus_mod``, applied to SecAgg+ messages only.

Order on the device: the app trains and applies DP (clip, noise) and returns its delta;
``secaggplus_mod`` then quantizes (clipping to ±clipping_range) and masks it. Only the
masked vector and plaintext metadata (number of examples, metrics) leave the device.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedpgen.shared import secagg_keys

secagg_keys.install_on_device()  # sk1 shared as its 48-byte scalar, a 12-byte mask seed (shared/secagg_keys.py)


def secagg_when_asked(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Route SecAgg+ protocol messages through ``secaggplus_mod``; pass everything else on."""
    if msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records:
        with secagg_keys.message_scope():  # each private key derived once per message, then dropped
            return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)
