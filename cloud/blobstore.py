"""Object storage for camera frames: one object per (chunk, camera), durable before the ack.

Two backends behind one small interface (docs/experience-path.md):

* :class:`LocalDirBlobStore` (``file:///abs/dir`` or a plain path; the default for ``fleet demo`` and one
  machine): ``put`` writes a temp file in the object's directory, fsyncs it, renames it over the object and
  fsyncs the directory, so a returned ``put`` survives a crash or power cut and a reader never sees half an
  object. Objects are flat files in 256 shard directories (a hash of the key).
* :class:`S3BlobStore` (``s3://bucket/prefix?endpoint=http://host:port``): boto3 PutObject/GetObject,
  DeleteObjects in batches of 1000, paginated ListObjectsV2. Region and credentials come the usual boto3
  way (environment, profile, instance role); ``AWS_ENDPOINT_URL`` works as well as ``?endpoint=``.

Every backend failure that a retry can fix (unreachable, timeout, 5xx, throttling, even a refused credential
an operator can fix) raises :class:`fleet.errors.BackendUnavailable`: the gateway answers UNAVAILABLE and acks
nothing. A missing object raises :class:`fleet.errors.BlobNotFound`; a key outside the allowed alphabet raises
:class:`fleet.errors.InvalidInput`. Thread-safe, blocking: asyncio callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import itertools
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path

from fleet import metrics
from fleet.errors import BackendUnavailable, BlobNotFound, ConfigError, InvalidInput

log = logging.getLogger(__name__)

MAX_KEY_CHARS = 1024
_KEY_RE = re.compile(r"[A-Za-z0-9._:/-]+")
MAX_LOCAL_KEY_CHARS = 240  # the local store's file name is the key: at most 255 bytes with the suffix
_SUFFIX = ".blob"
S3_DELETE_BATCH = 1000  # DeleteObjects' limit


def check_key(key: str) -> str:
    """``key`` if it is a valid object key, else InvalidInput naming the rule it breaks."""
    if not isinstance(key, str) or not key:
        raise InvalidInput(f"blob key must be a non-empty string, got {key!r}")
    if len(key) > MAX_KEY_CHARS:
        raise InvalidInput(f"blob key is {len(key)} chars, the limit is {MAX_KEY_CHARS}")
    if not _KEY_RE.fullmatch(key):
        raise InvalidInput(f"blob key {key[:80]!r} has characters outside [A-Za-z0-9._:/-]")
    if ".." in key or key.startswith("/") or key.endswith("/") or "//" in key:
        raise InvalidInput(f"blob key {key[:80]!r}: no '..', no leading or trailing '/', no empty path segment")
    return key


class BlobStore(abc.ABC):
    """Objects by key. Thread-safe; every call blocks."""

    url: str
    mode: str  # metric label: "local" or "s3"

    @abc.abstractmethod
    def put(self, key: str, data: bytes | memoryview) -> None:
        """Store ``data`` under ``key``, durably once this returns. Overwriting is allowed (resends)."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; BlobNotFound if there is none."""

    @abc.abstractmethod
    def delete(self, keys: Sequence[str]) -> None:
        """Remove the objects; missing keys are fine."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys that start with ``prefix`` (any order for the local store, lexicographic on S3)."""

    def close(self) -> None:
        """Release connections (nothing to do for the local store)."""

    def __enter__(self) -> BlobStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _measure(self, kind: str, nbytes: int = 0) -> Iterator[None]:
        """Count one operation by outcome, its bytes and its duration."""
        started = time.perf_counter()
        outcome = "ok"
        try:
            yield
        except BlobNotFound:
            outcome = "not_found"
            raise
        except BackendUnavailable:
            outcome = "unavailable"
            raise
        except InvalidInput:
            outcome = "invalid"
            raise
        except BaseException:
            outcome = "error"
            raise
        finally:
            metrics.BLOB_STORE_OPERATIONS.labels(mode=self.mode, kind=kind, outcome=outcome).inc()
            if outcome == "ok":
                metrics.BLOB_STORE_BYTES.labels(mode=self.mode, kind=kind).inc(nbytes)
                metrics.BLOB_STORE_DURATION.labels(mode=self.mode, kind=kind).observe(time.perf_counter() - started)


# --- local directory -------------------------------------------------------------------------------

_tmp_ids = itertools.count()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalDirBlobStore(BlobStore):
    """Objects as files ``root/<2 hex of the key's hash>/<key with "/" as "%">.blob``; durable when ``put`` returns.

    Flat names in 256 fixed shard directories: a put costs two fsyncs (the file, its directory) and never
    a mkdir, a delete leaves no empty directory behind, and ``%`` is outside the key alphabet, so the
    mapping is one-to-one."""

    mode = "local"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.url = self.root.as_uri()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for i in range(256):
                (self.root / f"{i:02x}").mkdir(exist_ok=True)
            _fsync_dir(self.root)
        except OSError as exc:
            raise ConfigError(f"blob store directory {self.root}: {exc}") from exc

    def _path(self, key: str) -> Path:
        check_key(key)
        if len(key) > MAX_LOCAL_KEY_CHARS:
            raise InvalidInput(f"blob key {key[:80]!r} is {len(key)} chars; the local store takes at most "
                               f"{MAX_LOCAL_KEY_CHARS} (a file name)")
        shard = hashlib.blake2b(key.encode(), digest_size=1).hexdigest()
        return self.root / shard / (key.replace("/", "%") + _SUFFIX)

    def put(self, key: str, data: bytes | memoryview) -> None:
        with self._measure("put", len(data)):
            path = self._path(key)
            tmp = path.parent / f".{os.getpid()}-{next(_tmp_ids)}.tmp"  # list() skips names starting with "."
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
                _fsync_dir(path.parent)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise BackendUnavailable(f"blob store {self.root}: writing {key!r} failed: {exc}") from exc

    def get(self, key: str) -> bytes:
        with self._measure("get"):
            path = self._path(key)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise BlobNotFound(f"no blob {key!r} in {self.url}") from None
            except OSError as exc:
                raise BackendUnavailable(f"blob store {self.root}: reading {key!r} failed: {exc}") from exc
        metrics.BLOB_STORE_BYTES.labels(mode=self.mode, kind="get").inc(len(data))
        return data

    def delete(self, keys: Sequence[str]) -> None:
        with self._measure("delete"):
            paths = [self._path(k) for k in keys]
            shards = set()
            for path in paths:
                try:
                    path.unlink()
                    shards.add(path.parent)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise BackendUnavailable(f"blob store {self.root}: deleting {path} failed: {exc}") from exc
            for shard in shards:
                _fsync_dir(shard)

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``, unordered (every shard is scanned: for audits and tests, not hot paths)."""
        if prefix and (not _KEY_RE.fullmatch(prefix) or ".." in prefix or prefix.startswith("/")):
            raise InvalidInput(f"blob key prefix {prefix[:80]!r} is not a valid key prefix")
        flat = prefix.replace("/", "%")
        for i in range(256):
            with self._measure("list"):
                try:
                    names = [e.name for e in os.scandir(self.root / f"{i:02x}")]
                except OSError as exc:
                    raise BackendUnavailable(f"blob store {self.root}: listing failed: {exc}") from exc
            for name in names:
                # temp files of puts in progress start with "." and end with ".tmp"
                if name.endswith(_SUFFIX) and not name.startswith(".") and name.startswith(flat):
                    yield name[: -len(_SUFFIX)].replace("%", "/")


# --- S3 ---------------------------------------------------------------------------------------------

_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}


class S3BlobStore(BlobStore):
    """Objects in ``bucket`` under ``prefix`` through boto3 (any S3-compatible endpoint)."""

    mode = "s3"

    def __init__(self, bucket: str, prefix: str = "", endpoint: str | None = None, region: str | None = None,
                 connect_timeout_s: float = 2.0, read_timeout_s: float = 10.0, max_attempts: int = 3,
                 max_pool_connections: int = 32):
        import boto3
        from botocore.config import Config

        if prefix and not prefix.endswith("/"):
            prefix += "/"
        if prefix:
            check_key(prefix[:-1])
        self.bucket, self.prefix, self.endpoint = bucket, prefix, endpoint
        query = f"?endpoint={endpoint}" if endpoint else ""
        self.url = f"s3://{bucket}/{prefix}{query}"
        # boto3's own retries, kept short: a blob put sits on the ack path, and the edge resends anyway.
        config = Config(retries={"max_attempts": max_attempts, "mode": "standard"},
                        connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
                        max_pool_connections=max_pool_connections)
        self.list_page_size = 1000  # ListObjectsV2's maximum
        self._client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)

    def _unavailable(self, what: str, exc: Exception) -> BackendUnavailable:
        return BackendUnavailable(f"object store {self.url}: {what} failed: {exc}")

    def _call(self, what: str, fn, **kwargs):
        import botocore.exceptions

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND_CODES:
                raise BlobNotFound(f"no blob {what!r} in {self.url}") from None
            raise self._unavailable(what, exc) from exc
        except botocore.exceptions.BotoCoreError as exc:  # connection refused/reset, timeouts, no credentials
            raise self._unavailable(what, exc) from exc

    def put(self, key: str, data: bytes | memoryview) -> None:
        with self._measure("put", len(data)):
            check_key(key)
            self._call(key, self._client.put_object, Key=self.prefix + key, Body=bytes(data))

    def get(self, key: str) -> bytes:
        import botocore.exceptions

        with self._measure("get"):
            check_key(key)
            response = self._call(key, self._client.get_object, Key=self.prefix + key)
            try:
                data = response["Body"].read()
            except (botocore.exceptions.BotoCoreError, OSError) as exc:
                raise self._unavailable(key, exc) from exc
        metrics.BLOB_STORE_BYTES.labels(mode=self.mode, kind="get").inc(len(data))
        return data

    def delete(self, keys: Sequence[str]) -> None:
        with self._measure("delete"):
            keys = [check_key(k) for k in keys]
            for start in range(0, len(keys), S3_DELETE_BATCH):
                batch = keys[start:start + S3_DELETE_BATCH]
                response = self._call(f"delete of {len(batch)} keys", self._client.delete_objects, Delete={
                    "Objects": [{"Key": self.prefix + k} for k in batch], "Quiet": True})
                errors = [e for e in response.get("Errors", []) if e.get("Code") not in _NOT_FOUND_CODES]
                if errors:
                    raise BackendUnavailable(f"object store {self.url}: {len(errors)} of {len(batch)} deletes failed, "
                                             f"first: {errors[0].get('Key')!r} {errors[0].get('Code')}")

    def list(self, prefix: str = "") -> Iterator[str]:
        import botocore.exceptions

        paginator = self._client.get_paginator("list_objects_v2")
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix,
                                        PaginationConfig={"PageSize": self.list_page_size}))
        while True:
            with self._measure("list"):
                try:
                    page = next(pages)
                except StopIteration:
                    return
                except botocore.exceptions.ClientError as exc:
                    raise self._unavailable(f"list {prefix!r}", exc) from exc
                except botocore.exceptions.BotoCoreError as exc:
                    raise self._unavailable(f"list {prefix!r}", exc) from exc
            for item in page.get("Contents", []):
                yield item["Key"][len(self.prefix):]

    def close(self) -> None:
        self._client.close()


# --- URL ----------------------------------------------------------------------------------------------

def open_blob_store(url: str) -> BlobStore:
    """The store a URL names: ``file:///abs/dir`` or a plain path (local), ``s3://bucket/prefix[?endpoint=URL]``.

    Its call counters exist from the start (at 0), so dashboards and alerts see the store before its first call."""
    store = _open(url)
    for kind in metrics.BLOB_STORE_KINDS:
        metrics.BLOB_STORE_OPERATIONS.labels(mode=store.mode, kind=kind, outcome="ok")
    return store


def _open(url: str) -> BlobStore:
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"blob store URL must be a non-empty string, got {url!r}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "s3":
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        unknown = set(query) - {"endpoint", "region"}
        if unknown:
            raise ConfigError(f"blob store URL {url!r}: unknown parameter(s) {sorted(unknown)} (known: endpoint, region)")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", parts.netloc or ""):
            raise ConfigError(f"blob store URL {url!r}: {parts.netloc!r} is not an S3 bucket name "
                              f"(s3://bucket/prefix, 3-63 chars of a-z 0-9 . -)")
        endpoint = query.get("endpoint", [None])[-1]
        if endpoint is not None and not re.fullmatch(r"https?://[^/?#\s]+/?", endpoint):
            raise ConfigError(f"blob store URL {url!r}: endpoint {endpoint!r} must be http(s)://host:port")
        prefix = parts.path.strip("/")
        try:
            return S3BlobStore(parts.netloc, prefix, endpoint=endpoint, region=query.get("region", [None])[-1])
        except InvalidInput as exc:
            raise ConfigError(f"blob store URL {url!r}: prefix {prefix!r}: {exc}") from None
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ConfigError(f"blob store URL {url!r}: use file:///absolute/dir")
        return LocalDirBlobStore(urllib.parse.unquote(parts.path))
    if parts.scheme and len(parts.scheme) > 1:  # "c:" would be a Windows drive letter
        raise ConfigError(f"blob store URL {url!r}: scheme {parts.scheme!r} unknown (file:///dir, s3://bucket/prefix "
                          f"or a directory path)")
    return LocalDirBlobStore(url)
