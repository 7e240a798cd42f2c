"""Coverage fingerprints of shared files: whether the regions several ranks wrote tile a file exactly.

A SHARDED component's files are written in regions (byte runs, see ``ckptd.protocol.FileSpec``) by several
ranks, possibly on several nodes. Each daemon fingerprints the runs it wrote, and the leader checks that the
fingerprints of every share add up to the whole file's, so a file where some bytes were written twice and
others never is refused before it can be committed (a byte count alone cannot tell).
"""

from __future__ import annotations

from ckptd.format.checksums import checksum_bytes

COVER_PRIME = (1 << 61) - 1  # a Mersenne prime: the fingerprints below are sums modulo it
COVER_PREFIX = "cover:"  # a region record's checksum field carries its coverage fingerprint


def coverage_key(txn: str) -> int:
    """The base of a transaction's coverage fingerprints: the same on every node (derived from the id)."""
    return 2 + int(checksum_bytes(f"ckptd-cover|{txn}".encode()).split(":")[1][:15], 16) % (COVER_PRIME - 3)


def _geometric(base: int, n: int) -> int:
    """``sum(base**i for i in range(n))`` modulo COVER_PRIME."""
    if base % COVER_PRIME == 1:
        return n % COVER_PRIME
    return (pow(base, n, COVER_PRIME) - 1) * pow(base - 1, COVER_PRIME - 2, COVER_PRIME) % COVER_PRIME


def coverage_fingerprint(runs: list[list[int]], key: int) -> int:
    """``sum(key**x)`` over every file offset ``x`` the runs write, modulo COVER_PRIME.

    The shares of a shared file cover it exactly once (no byte twice, none missing) iff, with overwhelming
    probability, their fingerprints add up to :func:`full_coverage` of its size: an overlap that leaves a
    hole of the same size changes the sum, which a byte count alone cannot see. O(1) per run record.

    Example:
        >>> k = coverage_key("t1")
        >>> halves = coverage_fingerprint([[0, 0, 4, 1, 4]], k) + coverage_fingerprint([[4, 0, 6, 1, 6]], k)
        >>> halves % COVER_PRIME == full_coverage(10, k)
        True
    """
    total = 0
    for file_offset, _, run_len, count, stride in runs:
        per_run = _geometric(key, run_len)
        total += pow(key, file_offset, COVER_PRIME) * per_run * _geometric(pow(key, stride, COVER_PRIME), count)
    return total % COVER_PRIME


def full_coverage(size: int, key: int) -> int:
    """The fingerprint of every offset of a ``size``-byte file once."""
    return _geometric(key, size)


def format_coverage(fingerprint: int) -> str:
    return f"{COVER_PREFIX}{fingerprint:016x}"


def parse_coverage(text: str) -> int | None:
    """The fingerprint in a region record's checksum field, or None if it holds none."""
    if not text.startswith(COVER_PREFIX) or len(text) != len(COVER_PREFIX) + 16:
        return None
    try:
        value = int(text[len(COVER_PREFIX) :], 16)
    except ValueError:
        return None
    return value if value < COVER_PRIME else None
