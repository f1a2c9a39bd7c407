"""``Cache``: one cache location and its cache-wide policy, held in one object.

The way ``joblib.Memory`` holds its location and ``bytes_limit``: the settings that belong to a
cache rather than to a loader (where it is, how large it may grow, how many versions of an
entry it keeps, who else writes it) are given once, and every loader made from it shares them::

    cache = Cache("/data/cache", max_size="200GB", keep=2)

    @cache.dataset(mmap_mode="r")          # per-loader options only
    def load_images(image_dir, size=(128, 128)): ...

    data = cache.image_folder("data/train", size=(64, 64))
    cache.entries(); cache.prune(); cache.verify(); cache.clear()

``cached_dataset(cache_dir=..., max_size=...)`` keeps working: it is the same thing spelled per
loader. A ``Cache`` is cheap (it opens nothing until used), compares equal by its settings and
pickles as them (to worker processes).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from cachedload.backends import open_root
from cachedload.decorator import CachedDataset, cached_dataset
from cachedload.manage import (
    EntryRecord,
    PruneReport,
    VerifyResult,
    prune_root,
    records_of,
    remove_entries,
    verify_root,
)
from cachedload.options import Options
from cachedload.root import CacheRoot

if TYPE_CHECKING:
    from cachedload.images import ImageFolderData

__all__ = ["CACHE_WIDE", "Cache"]

P = ParamSpec("P")
R = TypeVar("R")

#: The options that belong to a cache, not to a loader: set on :class:`Cache`.
CACHE_WIDE = (
    "keep",
    "local_cache_dir",
    "lock_timeout",
    "max_size",
    "safe_types",
    "shared",
    "signing_key",
    "storage_options",
)


class Cache:
    """A cache location with its cache-wide settings; loaders made from it share them.

    Args:
        location: a folder, or a remote cache's URL (``"s3://bucket/prefix"``); None: the
            default cache (``$CACHEDLOAD_DIR``, else the platform's user cache folder).
        max_size: bytes, or a string such as ``"200GB"``: after each store, least recently
            used entries go until the cache fits. None: no limit.
        keep: how many versions of an entry (same loader, code, parameters and source paths,
            other file contents) are kept, newest first (>= 1); None: all.
        lock_timeout: seconds a call waits for another process computing the same entry,
            then computes it too; None: waits as long as it takes.
        shared: the folder is shared with other users (see the security guide); a remote
            cache always is.
        safe_types: classes a shared cache's entries may hold besides plain data.
        signing_key: sign entries, and accept only entries signed with it (shared caches).
        storage_options: a remote cache's credentials, endpoint… (as for s3fs).
        local_cache_dir: where a remote cache's local copy lives.

    Raises:
        ConfigurationError: a setting is invalid (the error names it).

    Example:
        >>> cache = Cache("/tmp/team-cache", max_size="2GB", keep=2)
        >>> cache == Cache("/tmp/team-cache", keep=2, max_size="2GB")
        True
    """

    def __init__(
        self,
        location: str | os.PathLike[str] | None = None,
        *,
        max_size: int | str | None = None,
        keep: int | None = 1,
        lock_timeout: float | None = None,
        shared: bool = False,
        safe_types: Sequence[type] = (),
        signing_key: str | bytes | None = None,
        storage_options: dict[str, Any] | None = None,
        local_cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        settings: dict[str, Any] = {
            "keep": keep,
            "local_cache_dir": local_cache_dir,
            "lock_timeout": lock_timeout,
            "max_size": max_size,
            "safe_types": tuple(safe_types),
            "shared": shared,
            "signing_key": signing_key,
            "storage_options": storage_options,
        }
        self._options = Options(cache_dir=location, **settings)  # checks every setting
        self.location = location
        self._settings = settings
        self._opened: CacheRoot | None = None

    # -- identity ------------------------------------------------------------------------------
    def _key(self) -> tuple[Any, ...]:
        location = None if self.location is None else os.fspath(self.location)
        options = self._settings["storage_options"]
        return (
            location,
            *(self._settings[name] for name in CACHE_WIDE if name != "storage_options"),
            None if options is None else repr(sorted(options.items())),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cache) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={value!r}"
            for name, value in self._settings.items()
            if value != _DEFAULTS[name] and name != "signing_key"
        )
        where = "default location" if self.location is None else repr(os.fspath(self.location))
        return f"Cache({where}{', ' if shown else ''}{shown})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.location, self._settings))

    # -- loaders -------------------------------------------------------------------------------
    @overload
    def dataset(self, func: Callable[P, R], /) -> CachedDataset[P, R]: ...

    @overload
    def dataset(self, /, **options: Any) -> Callable[[Callable[P, R]], CachedDataset[P, R]]: ...

    def dataset(
        self, func: Callable[P, R] | None = None, /, **options: Any
    ) -> CachedDataset[P, R] | Callable[[Callable[P, R]], CachedDataset[P, R]]:
        """:func:`~cachedload.cached_dataset` on this cache: bare (``@cache.dataset``) or
        with per-loader options (``mmap_mode``, ``ignore``, ``depends_on``, ``version``,
        ``fingerprint``, ``verify``, ``source``, ``compress``, ``per_item``, ``include``,
        ``exclude``, ``portable``, ``enabled``).

        Raises:
            TypeError: a cache-wide setting (``max_size=``, ``keep=``…) or ``cache_dir=`` is
                given here: it belongs on the :class:`Cache`.
        """
        self._refuse_cache_wide(options, "dataset")
        chosen = {"cache_dir": self.location, **self._settings, **options}
        if func is None:
            return cached_dataset(**chosen)
        return cached_dataset(**chosen)(func)

    def image_folder(self, root: str | os.PathLike[str], **options: Any) -> ImageFolderData:
        """:func:`~cachedload.cached_image_folder` on this cache (its image options and
        ``mmap_mode=``; the cache-wide settings are this cache's)."""
        from cachedload.image_folder import cached_image_folder

        self._refuse_cache_wide(options, "image_folder")
        return cached_image_folder(root, cache_dir=self.location, **self._settings, **options)

    @staticmethod
    def _refuse_cache_wide(options: dict[str, Any], method: str) -> None:
        wide = sorted({"cache_dir", *CACHE_WIDE} & set(options))
        if wide:
            raise TypeError(
                f"Cache.{method}() got {', '.join(f'{name}=' for name in wide)}: "
                "cache-wide settings belong on the Cache (Cache(location, "
                f"{wide[-1]}=...)), shared by every loader made from it"
            )

    # -- managing it (what the command line does) -----------------------------------------------
    def _root(self) -> CacheRoot:
        if self._opened is None:
            settings = self._settings
            self._opened = open_root(
                self.location,
                storage_options=settings["storage_options"],
                local_cache_dir=settings["local_cache_dir"],
                shared=settings["shared"],
                safe_types=settings["safe_types"],
                signing_key=self._options.key_bytes(),
            )
        return self._opened

    def entries(self) -> list[EntryRecord]:
        """Every readable entry, newest first (what ``cachedload ls`` lists)."""
        return records_of(self._root())

    def prune(
        self,
        *,
        max_size: int | str | None = None,
        keep: int | None = None,
        older_than: float | str | None = None,
        dry_run: bool = False,
    ) -> PruneReport:
        """Apply this cache's limits now (or the ones given); see :func:`cachedload.prune`."""
        return prune_root(
            self._root(),
            max_size=self._settings["max_size"] if max_size is None else max_size,
            keep=self._settings["keep"] if keep is None else keep,
            older_than=older_than,
            dry_run=dry_run,
        )

    def verify(self, *, checksums: bool = True) -> list[VerifyResult]:
        """Check every entry (see :func:`cachedload.verify`)."""
        return list(verify_root(self._root(), checksums=checksums))

    def clear(self, *, dry_run: bool = False) -> PruneReport:
        """Delete every entry (those another process holds are kept and reported busy)."""
        root = self._root()
        report = remove_entries(records_of(root), dry_run=dry_run, reason="cleared")
        if not dry_run:
            root.tidy()
        return report


_DEFAULTS: dict[str, Any] = {
    "keep": 1,
    "local_cache_dir": None,
    "lock_timeout": None,
    "max_size": None,
    "safe_types": (),
    "shared": False,
    "signing_key": None,
    "storage_options": None,
}


def _rebuild(location: str | os.PathLike[str] | None, settings: dict[str, Any]) -> Cache:
    return Cache(location, **settings)
