"""Deterministic seeds derived from (run seed, role, partition, round, ...)."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any printable parts, e.g. ``(seed, "classify", pid, rnd)``."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
