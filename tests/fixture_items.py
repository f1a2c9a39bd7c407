"""A per-item loader whose cache entry, written before ``meta.json`` recorded the entry's
manifest, is checked in as ``tests/fixtures/cache-items-unrecorded/``: such an entry must stay
a hit, and its manifest (covered by nothing) stay usable in a private cache.

``portable=True`` keeps the checkout's location out of the key; the source files' mtimes are
set to :data:`SOURCE_MTIME` by the test (git does not keep mtimes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cachedload import cached_dataset

FIXTURES = Path(__file__).parent / "fixtures"
SOURCE = FIXTURES / "source-items"
CACHE = FIXTURES / "cache-items-unrecorded"
#: The mtime (seconds since the epoch) of every file of :data:`SOURCE` when the entry was made.
SOURCE_MTIME = 1_600_000_000
#: How many times the item function ran in this process (a hit leaves it unchanged).
CALLS = [0]


@cached_dataset(per_item="path", portable=True)
def read_item(path: str) -> Any:
    """A file's first 8 bytes as a row."""
    CALLS[0] += 1
    return np.frombuffer(Path(path).read_bytes().ljust(8, b"\0")[:8], np.uint8).copy()
