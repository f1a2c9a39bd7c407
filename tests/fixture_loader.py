"""A tiny loader whose cache entry, written by the code before issue 13, is checked in as
``tests/fixtures/cache-pre13/``: a cache written by an earlier version must still be a hit.

``portable=True`` keeps the checkout's location out of the key; the source files' mtimes are
set to :data:`SOURCE_MTIME` by the test (git does not keep mtimes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cachedload import cached_dataset

FIXTURES = Path(__file__).parent / "fixtures"
SOURCE = FIXTURES / "source-pre13"
CACHE = FIXTURES / "cache-pre13"
#: The mtime (seconds since the epoch) of every file of :data:`SOURCE` when the entry was made.
SOURCE_MTIME = 1_600_000_000
#: How many times the body ran in this process (a hit leaves it unchanged).
CALLS = [0]


@cached_dataset(portable=True, fingerprint="content")
def load_numbers(folder: Path, scale: int = 2) -> dict[str, np.ndarray]:
    """Each text file of ``folder`` as an array of its numbers times ``scale``."""
    CALLS[0] += 1
    return {
        path.stem: np.array(path.read_text().split(), dtype=np.int64) * scale
        for path in sorted(folder.glob("*.txt"))
    }
