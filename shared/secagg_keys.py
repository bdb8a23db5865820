"""SecAgg+'s private keys on the wire of secret sharing: the 48-byte scalar, not a 306-byte PEM.

In Flower's SecAgg+ every device Shamir-shares its private key ``sk1`` with its neighbours
(so that the server can remove a dropped device's pairwise masks) and serializes it for that
with ``private_key_to_bytes``: PKCS#8 PEM, 306 bytes for a P-384 key. Flower's
``create_shares`` splits a secret in 16-byte chunks and shares each chunk separately in pure
Python (pycryptodome's Shamir, about shares × threshold work per chunk): 20 chunks for the
PEM, against 3 for the 32-byte mask seed shared next to it. The key's secret is its scalar,
48 bytes (4 chunks with the padding). FedPGen serializes SecAgg+'s private keys as that
scalar and rebuilds the key from it with ``cryptography``'s ``ec.derive_private_key``: the
same secret is shared, by Flower's own code, in 7 chunks instead of 23 per device
(docs/scale.md, "SecAgg+ at 1,000 devices").

Two more device-side costs of the same kind. Flower's mod draws its self-mask seed as 32 random
bytes (3 chunks to share, 3 for the server to combine for every surviving device), and its
mask generator (``pseudo_rand_gen``) folds any seed to 32 bits before use (the known limit
stated in the audit): a 12-byte seed (96 bits) gives masks of exactly the same distribution,
shared in 1 chunk (``MASK_SEED_BYTES``; a test checks the fold, so a Flower that used the whole
seed would be noticed). And the mod rebuilds its private key from bytes for every neighbour
(ECDH per neighbour): inside :func:`message_scope` each key is derived once per message and
forgotten when the message is done, so nothing of one device's keys outlives its message.

Both ends use it: :func:`install_on_device` on a device's ClientApp process (Flower's
``secaggplus_mod`` serializes ``sk1`` and ``sk2`` and parses them back within the round),
:func:`install_on_server` on the ServerApp's (Flower's workflow parses the reconstructed
``sk1`` of a device that dropped after sharing its keys). The server's parser also takes
Flower's PEM, so a device running stock Flower still aggregates with a FedPGen server.
Nothing here is a cryptographic primitive: key generation, ECDH, encryption and secret
sharing stay Flower's and ``cryptography``'s.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator

from cryptography.hazmat.primitives.asymmetric import ec
from flwr.supercore.primitives import asymmetric as flower_keys

CURVE = ec.SECP384R1  # Flower's generate_key_pairs (flwr.supercore.primitives.asymmetric)
SCALAR_BYTES = (CURVE.key_size + 7) // 8  # 48
PEM_PREFIX = b"-----BEGIN"
MASK_SEED_BYTES = 12  # Flower's pseudo_rand_gen folds seeds to 32 bits; a multiple of 4 it asserts; 1 chunk
FLOWER_SEED_BYTES = 32  # what secaggplus_mod asks os.urandom for (its only use of os)
_message_keys: dict[bytes, ec.EllipticCurvePrivateKey] | None = None  # set inside message_scope only


def private_key_to_bytes(private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key's private scalar, big-endian, ``SCALAR_BYTES`` long."""
    if not isinstance(private_key.curve, CURVE):
        raise ValueError(f"SecAgg+ keys are on {CURVE.name}, not {private_key.curve.name}")
    return private_key.private_numbers().private_value.to_bytes(SCALAR_BYTES, "big")


def bytes_to_private_key(data: bytes) -> ec.EllipticCurvePrivateKey:
    """The key from its scalar (:func:`private_key_to_bytes`) or from Flower's PEM."""
    if data.startswith(PEM_PREFIX):
        return flower_keys.bytes_to_private_key(data)
    if len(data) != SCALAR_BYTES:
        raise ValueError(f"a SecAgg+ private key is {SCALAR_BYTES} bytes (or PEM), got {len(data)} bytes")
    if _message_keys is not None and data in _message_keys:
        return _message_keys[data]
    key = ec.derive_private_key(int.from_bytes(data, "big"), CURVE())
    if _message_keys is not None:
        _message_keys[data] = key
    return key


@contextlib.contextmanager
def message_scope() -> Iterator[None]:
    """Within one SecAgg+ message, each private key is derived from its bytes once; after the
    message, every derived key is dropped (one process serves many devices)."""
    global _message_keys
    _message_keys = {}
    try:
        yield
    finally:
        _message_keys = None


class _MaskSeedSource:
    """What Flower's ``secaggplus_mod`` sees as ``os``: it calls ``os.urandom(32)`` for the
    self-mask seed and nothing else of ``os`` (a test checks its source)."""

    @staticmethod
    def urandom(n: int) -> bytes:
        if n != FLOWER_SEED_BYTES:
            raise ValueError(f"secaggplus_mod asked for {n} random bytes; only its {FLOWER_SEED_BYTES}-byte "
                             "mask seed is expected (shared/secagg_keys.py)")
        return os.urandom(MASK_SEED_BYTES)


def install_on_device() -> None:
    """Flower's ``secaggplus_mod`` serializes and parses its private keys with the functions above."""
    # import_module: the package re-exports the function under the module's name
    module = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    module.private_key_to_bytes = private_key_to_bytes  # type: ignore[attr-defined]
    module.bytes_to_private_key = bytes_to_private_key  # type: ignore[attr-defined]
    module.os = _MaskSeedSource  # type: ignore[attr-defined]


def install_on_server() -> None:
    """Flower's SecAgg+ workflow parses a reconstructed ``sk1`` with :func:`bytes_to_private_key`."""
    module = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")
    module.bytes_to_private_key = bytes_to_private_key  # type: ignore[attr-defined]
