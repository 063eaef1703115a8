"""Deterministic seeds derived from several integers (Python's hash() is salted per process; this is not)."""
import hashlib


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part, identical in every process and every run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
