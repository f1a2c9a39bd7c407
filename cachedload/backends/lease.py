"""Single flight across machines: a lease object in the bucket.

The holder creates ``<key>.lease`` with ``If-None-Match: *`` (exactly one creator wins) and, from a
background thread, rewrites it every third of the lease's duration with ``If-Match`` on its last
ETag, so its ``LastModified`` stays fresh. A contender that finds the lease takes it over only once
it has gone unrenewed for longer than the duration — judged on the *server's* clock alone, by
comparing the object's ``LastModified`` with the reply's ``Date`` — and does so with ``If-Match`` on
the ETag it saw, so two contenders cannot both take it over. A holder killed mid-computation is
thus replaced after one lease duration; clocks on the nodes never matter.

This is an optimisation: publishing is correct without it (see :mod:`cachedload.backends.remote`).
It has the interface of a ``filelock`` lock, which the decorator drives.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any

from cachedload.backends.objects import ObjectStore, PreconditionFailed

__all__ = ["ObjectLease"]

logger = logging.getLogger("cachedload")

_MAX_POLL = 2.0


class ObjectLease:
    """A lease on ``key`` in ``store``, shaped like a ``filelock`` lock.

    Args:
        store: the object store.
        key: the lease object's key.
        timeout: default seconds :meth:`acquire` waits; ``None`` or negative: as long as the
            holder keeps renewing.
        duration: seconds without renewal after which a lease is considered abandoned.
        atomic_takeover: the server honours ``If-Match``, so taking over an expired lease is
            atomic. Without it a takeover deletes and re-creates the lease (two contenders may
            then both proceed: duplicate work, never wrong data).
        done: called while waiting; once it returns True (the entry the holder was computing is
            published), :meth:`acquire` returns *without* holding the lease, so that waiters do
            not queue up behind each other to read the result.
    """

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        *,
        timeout: float | None,
        duration: float,
        atomic_takeover: bool = True,
        done: Callable[[], bool] | None = None,
    ) -> None:
        self.store = store
        self.key = key
        self.lock_file = f"{store.url}/{key}"
        self.timeout = -1.0 if timeout is None else float(timeout)
        self.duration = float(duration)
        self.atomic_takeover = atomic_takeover
        self._done = done
        self._etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._reported_holder = False
        self._token = ""
        self._renewals = 0

    @property
    def is_locked(self) -> bool:
        """True while this object holds the lease."""
        return self._etag is not None

    def _body(self) -> bytes:
        # "renewed" changes the ETag at every renewal, so that a contender that saw the lease
        # expired just before a renewal cannot take it over with If-Match on the old ETag.
        self._renewals += 1
        owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "duration": self.duration,
            "token": self._token,
            "renewed": self._renewals,
        }
        return json.dumps(owner).encode()

    def acquire(self, timeout: float | None = None, poll_interval: float | None = None) -> Any:
        """Take the lease, waiting up to ``timeout`` seconds (default: the constructor's).

        Returns early, not holding it, once ``done()`` says the awaited entry exists.

        Raises:
            filelock.Timeout: the lease is still held by a live holder after ``timeout``.
            OSError: the store cannot be reached or written.
        """
        from filelock import Timeout

        if self._etag is not None:
            return self
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout < 0 else time.monotonic() + timeout
        delay = 0.05 if poll_interval is None else poll_interval
        self._token = uuid.uuid4().hex
        first = True
        while True:
            if self._try_acquire(first):
                self._start_renewing()
                return self
            if self._done is not None and self._done():
                logger.debug("%s: the awaited entry was published meanwhile", self.lock_file)
                return self
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise Timeout(self.lock_file)
            first = False
            pause = delay * random.uniform(0.8, 1.2)  # apart, so waiters do not poll in step
            time.sleep(pause if remaining is None else min(pause, remaining))
            delay = min(delay * 1.5, _MAX_POLL, max(self.duration / 4, 0.05))

    def _try_acquire(self, first: bool) -> bool:
        # Polls look before they write: a HEAD is cheaper than a PUT, for S3's bill too.
        info = None if first else self.store.head(self.key)
        if info is None:
            try:
                self._etag = self.store.put(self.key, self._body(), if_none_match=True)
                return True
            except PreconditionFailed:
                info = self.store.head(self.key)
            if info is None:
                return False  # released just now: try again on the next round
        age = info.age
        if not self._reported_holder:
            self._reported_holder = True
            holder = self.store.get(self.key) or b"?"
            logger.info("%s is held by %s", self.lock_file, holder.decode(errors="replace"))
        if age is None or age <= self.duration:
            return False
        logger.info(
            "%s was last renewed %.0f s ago (lease %.0f s): taking it over",
            self.lock_file,
            age,
            self.duration,
        )
        try:
            if self.atomic_takeover:
                self._etag = self.store.put(self.key, self._body(), if_match=info.etag)
            else:
                self.store.delete(self.key)
                self._etag = self.store.put(self.key, self._body(), if_none_match=True)
        except (PreconditionFailed, FileNotFoundError):
            return False  # another contender took it first
        return True

    def _start_renewing(self) -> None:
        self._stop = threading.Event()
        self._renewer = threading.Thread(
            target=self._renew, args=(self._stop,), name=f"cachedload-lease-{self.key}", daemon=True
        )
        self._renewer.start()

    def _renew(self, stop: threading.Event) -> None:
        while not stop.wait(self.duration / 3):
            etag = self._etag
            if etag is None:
                return
            try:
                new = self.store.put(
                    self.key, self._body(), if_match=etag if self.atomic_takeover else None
                )
            except PreconditionFailed:
                logger.warning(
                    "lost the lease %s (not renewed in time, another process took it over); "
                    "both may now compute the entry, which is harmless",
                    self.lock_file,
                )
                self._etag = None
                return
            except OSError as error:
                logger.debug("cannot renew %s (will retry): %s", self.lock_file, error)
                continue
            if self._etag == etag:  # release() reads the ETag only after this thread stops
                self._etag = new

    def release(self, force: bool = False) -> None:
        """Give the lease up (a no-op if it is not held)."""
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join(timeout=30)
        self._renewer = None
        etag, self._etag = self._etag, None
        if etag is None:
            return
        try:
            self.store.delete(self.key, if_match=etag if self.atomic_takeover else None)
        except PreconditionFailed:
            # Renewed under our feet (a renewal outlived the join), or taken over: delete it
            # only if it is still ours.
            current = self.store.get(self.key) or b"{}"
            if self._token and self._token.encode() in current:
                self.store.delete(self.key)
            else:
                logger.debug("%s was taken over before release", self.lock_file)
        except (NotImplementedError, OSError) as error:
            logger.debug("cannot delete %s conditionally (%s); deleting it", self.lock_file, error)
            try:
                self.store.delete(self.key)
            except OSError as again:
                logger.info("cannot release %s: %s (it expires by itself)", self.lock_file, again)

    def __enter__(self) -> ObjectLease:
        return self.acquire()  # type: ignore[no-any-return]

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
