"""An S3-compatible bucket as an :class:`~cachedload.backends.objects.ObjectStore`, with boto3.

boto3 is used directly (not through s3fs) because a shared cache rests on details s3fs hides:
conditional writes (``IfNoneMatch="*"``, ``IfMatch``) on single and multipart uploads, their
exact error codes (412, and 409 while another conditional write is in flight), and the ``Date``
header of each reply, by which lease expiry is judged on the server's clock.

``storage_options`` are spelled as for s3fs (``key``, ``secret``, ``token``, ``endpoint_url``,
``client_kwargs``, ``config_kwargs``, ``profile``, ``anon``, ``s3_additional_kwargs``…), so the
same dictionary works with both; the usual ``AWS_*`` environment variables (including
``AWS_ENDPOINT_URL``) and ``~/.aws`` files apply as for any boto3 client.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import json
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any, BinaryIO

from cachedload.backends.objects import (
    ObjectInfo,
    ObjectStore,
    PreconditionFailed,
    Progress,
    Sink,
)
from cachedload.errors import ConfigurationError

__all__ = ["S3ObjectStore", "client_arguments"]

logger = logging.getLogger("cachedload")

_CREDENTIALS = {
    "key": "aws_access_key_id",
    "username": "aws_access_key_id",
    "aws_access_key_id": "aws_access_key_id",
    "secret": "aws_secret_access_key",
    "password": "aws_secret_access_key",
    "aws_secret_access_key": "aws_secret_access_key",
    "token": "aws_session_token",
    "aws_session_token": "aws_session_token",
}
_CLIENT = ("endpoint_url", "region_name", "use_ssl", "verify")
# s3fs options about its own caching and event loop: meaningless here, accepted for compatibility.
_S3FS_ONLY = frozenset(
    {
        "default_block_size",
        "default_fill_cache",
        "default_cache_type",
        "version_aware",
        "cache_regions",
        "asynchronous",
        "loop",
        "max_concurrency",
        "fixed_upload_size",
        "skip_instance_cache",
        "use_listings_cache",
        "listings_expiry_time",
        "max_paths",
    }
)
# Third-party servers often reject the CRC trailers botocore sends by default since 1.36; the
# cache checks every download against its own xxh3 checksum anyway.
_DEFAULT_CONFIG = {
    "retries": {"max_attempts": 4, "mode": "standard"},
    "connect_timeout": 10,
    "read_timeout": 120,
    "request_checksum_calculation": "when_required",
    "response_checksum_validation": "when_required",
}
_CLIENTS: dict[tuple[int, str], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def client_arguments(
    storage_options: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Split s3fs-style ``storage_options`` into boto3 session, client and request arguments.

    Raises:
        ConfigurationError: an option is unknown to both s3fs and boto3.
    """
    session: dict[str, Any] = {}
    client: dict[str, Any] = {}
    request: dict[str, Any] = {}
    config = dict(_DEFAULT_CONFIG)
    for name, value in storage_options.items():
        if name in _CREDENTIALS:
            client[_CREDENTIALS[name]] = value
        elif name in _CLIENT:
            client[name] = value
        elif name == "client_kwargs":
            client.update(value or {})
        elif name == "config_kwargs":
            config.update(value or {})
        elif name == "profile":
            session["profile_name"] = value
        elif name == "anon":
            if value:
                from botocore import UNSIGNED

                config["signature_version"] = UNSIGNED
        elif name == "s3_additional_kwargs":
            request.update(value or {})
        elif name == "requester_pays":
            if value:
                request["RequestPayer"] = "requester"
        elif name not in _S3FS_ONLY:
            raise ConfigurationError(
                "storage_options", f"unknown option {name!r} for an s3:// cache"
            )
    from botocore.config import Config

    client["config"] = Config(**config)
    return session, client, request


def _client(storage_options: dict[str, Any]) -> Any:
    """One boto3 client per process and set of options (making one costs tens of ms)."""
    # The AWS_* variables count too: they configure the client when the options do not.
    aws = {name: value for name, value in os.environ.items() if name.startswith("AWS_")}
    signature = json.dumps([storage_options, aws], sort_keys=True, default=repr)
    cache_key = (os.getpid(), signature)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(cache_key)
        if client is None:
            import boto3

            session_args, client_args, _ = client_arguments(storage_options)
            client = boto3.session.Session(**session_args).client("s3", **client_args)
            _CLIENTS[cache_key] = client
        return client


def _server_time(response: dict[str, Any]) -> float | None:
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if not date:
        return None
    try:
        return email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return None


def _oserror(error: Exception, url: str) -> OSError:
    """The built-in exception a failed request amounts to (the boto3 error is its cause)."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(error, ClientError):
        details = error.response.get("Error", {})
        code = str(details.get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = f"{code or status}: {details.get('Message') or error}"
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (412, 409):
            return PreconditionFailed(url, message)
        if code in ("NoSuchKey", "NoSuchBucket", "NotFound", "404") or status == 404:
            return FileNotFoundError(errno.ENOENT, message, url)
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return PermissionError(errno.EACCES, message, url)
        if status == 501 or code == "NotImplemented":
            return OSError(errno.EOPNOTSUPP, message, url)
        if status == 400:
            return OSError(errno.EINVAL, message, url)
        return OSError(errno.EIO, message, url)
    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return PermissionError(errno.EACCES, f"no usable AWS credentials: {error}", url)
    if isinstance(error, ConnectionError):
        return ConnectionRefusedError(errno.ECONNREFUSED, str(error), url)
    return OSError(errno.EIO, f"{type(error).__name__}: {error}", url)


class S3ObjectStore(ObjectStore):
    """Objects under ``s3://bucket/prefix``.

    Uploads larger than :attr:`multipart_threshold` go in parts of :attr:`part_size` bytes, the
    condition applying to the final ``CompleteMultipartUpload``, so they too appear all at once.
    """

    has_server_clock = True
    #: Objects above this size are uploaded in parts (S3 caps a single PUT at 5 GB).
    multipart_threshold = 256 * 1024 * 1024
    #: Part size of multipart uploads (10 000 parts of 64 MiB: objects up to 640 GB).
    part_size = 64 * 1024 * 1024

    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        scheme, _, rest = url.partition("://")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ConfigurationError("cache_dir", f"{url!r} names no bucket")
        self.url = f"{scheme}://{bucket}/{prefix.strip('/')}".rstrip("/")
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self._options = dict(storage_options)

    @property
    def identity(self) -> str:
        """The server's endpoint and this store's bucket and prefix."""
        return f"{self.client.meta.endpoint_url}/{self.bucket}/{self.prefix}"

    @property
    def client(self) -> Any:
        """The boto3 S3 client (shared by the stores of this process with the same options)."""
        return _client(self._options)

    def _call(self, operation: str, key: str, **arguments: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **arguments)
        except (ClientError, BotoCoreError) as error:
            raise _oserror(error, f"{self.url}/{key}") from error

    def get(self, key: str) -> bytes | None:
        try:
            response = self._call("get_object", key, Key=self.prefix + key)
            data: bytes = response["Body"].read()
        except FileNotFoundError:
            return None
        return data

    def head(self, key: str) -> ObjectInfo | None:
        try:
            response = self._call("head_object", key, Key=self.prefix + key)
        except FileNotFoundError:
            return None
        return ObjectInfo(
            key,
            int(response.get("ContentLength", 0)),
            str(response.get("ETag", "")),
            response["LastModified"].timestamp() if response.get("LastModified") else 0.0,
            _server_time(response),
            {k.lower(): str(v) for k, v in (response.get("Metadata") or {}).items()},
        )

    def download(self, key: str, sink: Sink, *, progress: Progress | None = None) -> int:
        from botocore.exceptions import BotoCoreError

        response = self._call("get_object", key, Key=self.prefix + key)
        total = 0
        try:
            for chunk in response["Body"].iter_chunks(1 << 20):
                sink.write(chunk)
                total += len(chunk)
                if progress is not None:
                    progress(len(chunk))
        except BotoCoreError as error:
            raise _oserror(error, f"{self.url}/{key}") from error
        return total

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        size: int | None = None,
        if_none_match: bool = False,
        if_match: str | None = None,
        metadata: dict[str, str] | None = None,
        progress: Progress | None = None,
    ) -> str:
        request = client_arguments(self._options)[2]  # e.g. ServerSideEncryption
        arguments: dict[str, Any] = {"Key": self.prefix + key, **request}
        if metadata:
            arguments["Metadata"] = metadata
        condition: dict[str, str] = {}
        if if_none_match:
            condition["IfNoneMatch"] = "*"
        if if_match is not None:
            condition["IfMatch"] = if_match
        if isinstance(data, bytes) or size is None or size <= self.multipart_threshold:
            response = self._call("put_object", key, Body=data, **arguments, **condition)
            if progress is not None:
                progress(size if size is not None else len(data))  # type: ignore[arg-type]
            return str(response.get("ETag", ""))
        return self._put_parts(key, data, arguments, condition, progress)

    def _put_parts(
        self,
        key: str,
        data: BinaryIO,
        arguments: dict[str, Any],
        condition: dict[str, str],
        progress: Progress | None,
    ) -> str:
        upload = self._call("create_multipart_upload", key, **arguments)["UploadId"]
        target = {"Key": arguments["Key"], "UploadId": upload}
        try:
            parts: list[dict[str, Any]] = []
            while chunk := data.read(self.part_size):
                number = len(parts) + 1
                reply = self._call("upload_part", key, PartNumber=number, Body=chunk, **target)
                parts.append({"ETag": reply["ETag"], "PartNumber": number})
                if progress is not None:
                    progress(len(chunk))
            response = self._call(
                "complete_multipart_upload",
                key,
                MultipartUpload={"Parts": parts},
                **target,
                **condition,
            )
        except BaseException:
            try:
                self._call("abort_multipart_upload", key, **target)
            except OSError as error:
                logger.debug("cannot abort the upload of %s: %s", key, error)
            raise
        return str(response.get("ETag", ""))

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        condition = {} if if_match is None else {"IfMatch": if_match}
        with contextlib.suppress(FileNotFoundError):
            self._call("delete_object", key, Key=self.prefix + key, **condition)

    def iter_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        from botocore.exceptions import BotoCoreError, ClientError

        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix
        )
        try:
            for page in pages:
                for item in page.get("Contents", ()):
                    yield ObjectInfo(
                        item["Key"][len(self.prefix) :],
                        int(item.get("Size", 0)),
                        str(item.get("ETag", "")),
                        item["LastModified"].timestamp() if item.get("LastModified") else 0.0,
                    )
        except (ClientError, BotoCoreError) as error:
            raise _oserror(error, f"{self.url}/{prefix}") from error

    def list_dirs(self, prefix: str) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix, Delimiter="/"
        )
        names = []
        try:
            for page in pages:
                for common in page.get("CommonPrefixes", ()):
                    names.append(common["Prefix"][len(self.prefix + prefix) :].rstrip("/"))
        except (ClientError, BotoCoreError) as error:
            raise _oserror(error, f"{self.url}/{prefix}") from error
        return sorted(names)
