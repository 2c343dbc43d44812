"""Seeds for the random draws of training, derived from the run's seed and the position in training.

A draw seeded by (seed, epoch, batch, rank) is the same in an interrupted and resumed run as in an uninterrupted
one, with no generator state to save: the position in training is all a checkpoint needs to carry.
"""

from __future__ import annotations

import hashlib
import os


def run_seed() -> int:
    """The run's seed: Lightning's own variable, which `--seed_everything` sets (0 when unseeded)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part; neighbouring positions give unrelated seeds.

    Hashed, not summed: seed + epoch would repeat epoch 1 of seed 0 as epoch 0 of seed 1.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
