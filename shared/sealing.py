"""Encryption at rest for a device's state-dir: AES-256-GCM from ``cryptography``.

Every file the device keeps (personal part, bookkeeping, privacy plan, accountant state,
ledger) is sealed with the device key; the file's role is the associated data, so a sealed
file cannot be swapped for another role's. Any change to a sealed file fails
authentication and raises :class:`TamperedStateError`: the device refuses to train rather
than train on garbage. The ledger seals each line, chained to the previous line's digest,
so a removed, reordered or edited event is detected too.

The key is 32 random bytes in a key file created with 0600 permissions (default
``<state-dir>/../<name>.key`` in simulation, any path in deployment), or derived from a
passphrase with scrypt (salt stored beside the state). No primitive is written here.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

NONCE = 12
MAGIC = b"FPG1"  # format marker: a plaintext or foreign file is reported as such, not as garbage


class TamperedStateError(RuntimeError):
    """A sealed state file failed authentication: modified, truncated, swapped, or another key."""


def load_or_create_key(path: Path) -> bytes:
    """The device key from ``path``; created (32 random bytes, mode 0600) if absent.

    Refuses a key file readable by group or others."""
    path = Path(path)
    if path.is_file():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise PermissionError(f"device key {path} has mode {oct(mode)}: it must be 0600 (chmod 600 {path})")
        key = path.read_bytes()
        if len(key) != 32:
            raise ValueError(f"device key {path}: {len(key)} bytes, expected 32")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = AESGCM.generate_key(bit_length=256)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
        fh.flush()
        os.fsync(fh.fileno())
    return key


def key_from_passphrase(passphrase: str, salt_file: Path) -> bytes:
    """A 32-byte key derived from ``passphrase`` with scrypt; the random salt is kept in ``salt_file``."""
    if not passphrase:
        raise ValueError("empty passphrase")
    salt_file = Path(salt_file)
    if not salt_file.is_file():
        salt_file.parent.mkdir(parents=True, exist_ok=True)
        salt_file.write_bytes(os.urandom(16))
    return Scrypt(salt=salt_file.read_bytes(), length=32, n=2**15, r=8, p=1).derive(passphrase.encode())


class Sealer:
    """Seal and open byte strings bound to a role name (the associated data)."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, role: str, plaintext: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return MAGIC + nonce + self._aead.encrypt(nonce, plaintext, role.encode())

    def open(self, role: str, blob: bytes, *, where: str = "") -> bytes:
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + NONCE + 16:
            raise TamperedStateError(f"{where or role}: not a sealed state file (plaintext, truncated or foreign)")
        nonce, body = blob[len(MAGIC) : len(MAGIC) + NONCE], blob[len(MAGIC) + NONCE :]
        try:
            return self._aead.decrypt(nonce, body, role.encode())
        except InvalidTag:
            raise TamperedStateError(f"{where or role}: authentication failed (modified on disk, swapped, "
                                     "or sealed with another key); refusing to use it") from None

    def seal_line(self, role: str, previous: str, plaintext: bytes) -> str:
        """One ledger line: sealed, bound to the role and to the previous line (a chain)."""
        return base64.b64encode(self.seal(f"{role}|{_digest(previous)}", plaintext)).decode()

    def open_lines(self, role: str, lines: list[str], *, where: str = "") -> list[bytes]:
        out, previous = [], ""
        for n, line in enumerate(lines, 1):
            try:
                blob = base64.b64decode(line, validate=True)
            except ValueError:
                raise TamperedStateError(f"{where}:{n}: not a sealed ledger line") from None
            out.append(self.open(f"{role}|{_digest(previous)}", blob, where=f"{where}:{n}"))
            previous = line
        return out


def _digest(line: str) -> str:
    return hashlib.sha256(line.encode()).hexdigest()
