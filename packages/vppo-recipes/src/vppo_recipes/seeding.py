"""Seeds that are pure functions of integers, so every rank, any world size and a resumed run draw alike."""

from __future__ import annotations


def mix_seed(*values: int) -> int:
    """A deterministic 31-bit seed from integers (splitmix64 steps); the same inputs give the same seed on any rank."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return int(x & 0x7FFFFFFF)
