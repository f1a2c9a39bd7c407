"""HMAC-SHA256 signatures of entries, for shared caches whose writers hold a common key.

A signature covers an entry's metadata (canonical JSON: sorted keys, no spaces, UTF-8, without
the ``signature`` field itself and the data file's name) and its data file's checksum, so
neither can be changed, and no
entry made, by someone without the key. It proves the data only as far as the checksum does:
a reader must check the data file against that checksum before trusting it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["SIGNATURE_FIELD", "sign", "verify_signature"]

SIGNATURE_FIELD = "signature"
_DOMAIN = b"cachedload-entry-v1\0"  # a signature of something else never passes for an entry's


def _message(meta: Mapping[str, Any], data_checksum: str) -> bytes:
    fields = {name: value for name, value in meta.items() if name != SIGNATURE_FIELD}
    data = fields.get("data")
    if isinstance(data, dict):  # its file name is where it is (renamed in a bucket), not what
        fields["data"] = {name: value for name, value in data.items() if name != "file"}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _DOMAIN + canonical.encode() + b"\0" + data_checksum.encode()


def sign(meta: Mapping[str, Any], data_checksum: str, key: bytes) -> str:
    """The hex HMAC-SHA256 of ``meta`` (minus its ``signature`` field) and ``data_checksum``.

    Example:
        >>> sign({"key": "ab"}, "00ff", b"secret") == sign({"key": "ab"}, "00ff", b"secret")
        True
    """
    return hmac.new(key, _message(meta, data_checksum), hashlib.sha256).hexdigest()


def verify_signature(meta: Mapping[str, Any], data_checksum: str, key: bytes) -> bool:
    """Whether ``meta[SIGNATURE_FIELD]`` is the signature of ``meta`` and ``data_checksum``.

    False when the field is missing or not a string. The comparison takes the same time
    wherever the signatures differ.
    """
    signature = meta.get(SIGNATURE_FIELD)
    if not isinstance(signature, str):
        return False
    return hmac.compare_digest(signature.encode(), sign(meta, data_checksum, key).encode())
