"""The one storage seam: local paths and `s3://bucket/prefix` URLs.

Every read, write, listing and stream in genpt-dist goes through here; boto3 is created in this module
and nowhere else. URLs are plain strings. S3 settings come from the standard AWS chain; the endpoint
from `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`) so MinIO, R2 or a local moto server work the same;
retries use botocore's `standard` mode (`AWS_RETRY_MODE=adaptive` switches) with `AWS_MAX_ATTEMPTS`.

Every read (`size`, `read_bytes`, `read_json`, `open_stream`, `download_file`, ...) raises
`FileNotFoundError` for a missing local path or S3 key, so callers test for absence one way.

Multi-file outputs become visible through `publish`: the files go first, the marker (a manifest or
meta file) last, and readers treat a folder without its marker as absent.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

from genpt_dist.errors import UserError

MULTIPART_THRESHOLD = 64 << 20
DEFAULT_REGION = "us-east-1"


@functools.cache
def _umask() -> int:
    """The process umask (read once, when a first file is written; reading it means setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- URLs


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise UserError(f"bad S3 URL {url!r}: no bucket")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join URL parts with '/', for local paths and s3 alike."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def normalize(url: str) -> str:
    """Absolute local paths; S3 URLs unchanged (minus a trailing slash)."""
    return url.rstrip("/") if is_s3(url) else str(Path(url).expanduser().resolve())


def name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------- S3 client


def s3_settings() -> dict[str, Any]:
    """Endpoint, region and retry policy from the environment (credentials stay with boto3's chain)."""
    return {
        "endpoint_url": os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None,
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
        "retry_mode": os.environ.get("AWS_RETRY_MODE", "standard"),
        "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "8")),
    }


@lru_cache(maxsize=4)
def _session_for(region: str, credentials_key: str):  # noqa: ARG001  (a new session when the keys change)
    import boto3

    # Shared across fork: a session holds no connections, and its loaded service model spares each
    # forked DataLoader worker loading it again to make its client.
    return boto3.session.Session(region_name=region)


@lru_cache(maxsize=4)
def _client_for(pid: int, settings_key: str):  # noqa: ARG001  (pid: a fresh client after fork)
    from botocore.config import Config as BotoConfig

    s = json.loads(settings_key)
    cfg = BotoConfig(
        retries={"mode": s["retry_mode"], "max_attempts": s["max_attempts"]},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=32,
    )
    session = _session_for(s["region"], s["credentials"])
    return session.client("s3", endpoint_url=s["endpoint_url"], config=cfg)


def reset_clients() -> None:
    """Forget cached sessions and clients (after changing the S3 settings in this process)."""
    _client_for.cache_clear()
    _session_for.cache_clear()


def _credentials_key() -> str:
    """Which credentials the environment names (hashed): a changed key or profile gets a new client."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    raw = "\0".join(os.environ.get(n, "") for n in names)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def s3_client():
    """A boto3 S3 client for this process, built lazily (safe across fork and Ray workers)."""
    key = json.dumps({**s3_settings(), "credentials": _credentials_key()}, sort_keys=True)
    return _client_for(os.getpid(), key)


def pyarrow_filesystem(url: str):
    """(filesystem, path) for Ray Train's `RunConfig(storage_path=..., storage_filesystem=...)`.

    The S3 filesystem is built from the same settings and credentials as the boto3 client."""
    if not is_s3(url):
        return None, normalize(url)
    import boto3
    from pyarrow import fs

    s = s3_settings()
    creds = boto3.session.Session(region_name=s["region"]).get_credentials()
    kwargs: dict[str, Any] = {"region": s["region"], "retry_strategy": fs.AwsStandardS3RetryStrategy(s["max_attempts"])}
    if creds is not None:
        frozen = creds.get_frozen_credentials()
        kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token)
    if s["endpoint_url"]:
        scheme, _, host = s["endpoint_url"].partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
    bucket, key = split_s3(url)
    return fs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


def _s3_error(exc: Exception, url: str) -> Exception:
    """A missing key -> `FileNotFoundError` (as for a local path); the boto errors a user can fix -> a
    one-line `UserError`; anything else unchanged."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if _is_missing(exc):
        return FileNotFoundError(f"no such S3 object: {url}")
    if isinstance(exc, NoCredentialsError):
        return UserError(
            f"no AWS credentials found for {url} (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
        )
    if isinstance(exc, EndpointConnectionError):
        return UserError(f"cannot reach the S3 endpoint for {url}: {exc.kwargs.get('endpoint_url', '')}")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        bucket = split_s3(url)[0]
        if code == "NoSuchBucket":
            return UserError(f"S3 bucket {bucket!r} does not exist ({url})")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return UserError(f"S3 rejected the credentials for {url} ({code})")
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            return UserError(f"S3 access denied for {url}")
    return exc


def _call(url: str, fn, *args, **kwargs):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(*args, **kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise _s3_error(exc, url) from exc


def _is_missing(exc: Exception) -> bool:
    """A 404 on a key (HEAD answers a bare "404", GET "NoSuchKey"); a missing bucket is not this."""
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in (
        "404",
        "NoSuchKey",
        "NotFound",
    )


# ---------------------------------------------------------------- queries


def exists(url: str) -> bool:
    """True if a file (object) exists at `url`."""
    if not is_s3(url):
        return Path(url).is_file()
    bucket, key = split_s3(url)
    try:
        _call(url, s3_client().head_object, Bucket=bucket, Key=key)
        return True
    except FileNotFoundError:
        return False


def size(url: str) -> int:
    """The file's size in bytes (`FileNotFoundError` if there is none)."""
    if not is_s3(url):
        return Path(url).stat().st_size
    bucket, key = split_s3(url)
    return _call(url, s3_client().head_object, Bucket=bucket, Key=key)["ContentLength"]


def list_files(url: str) -> list[str]:
    """Every file under the folder/prefix `url`, recursively, sorted, as full URLs (S3 "folder" marker
    objects, the empty keys ending in "/" that pyarrow and consoles create, are not files)."""
    if not is_s3(url):
        root = Path(url)
        if root.is_file():
            return [str(root)]
        return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    bucket, key = split_s3(url)
    prefix = key.rstrip("/") + "/" if key else ""
    out: list[str] = []
    paginator = s3_client().get_paginator("list_objects_v2")
    pages = _call(url, lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix)))
    for page in pages:
        out.extend(f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", []) if not obj["Key"].endswith("/"))
    return sorted(out)


def check_bucket(url: str) -> None:
    """Fail early with a clear message if an S3 URL's bucket is missing or unreadable."""
    if not is_s3(url):
        return
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _ = split_s3(url)
    client = s3_client()
    try:
        client.head_bucket(Bucket=bucket)
        return
    except BotoCoreError as exc:
        raise _s3_error(exc, url) from exc
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise UserError(f"S3 bucket {bucket!r} does not exist ({url})") from None
        if code not in ("403", "AccessDenied"):
            raise _s3_error(exc, url) from exc
    # HEAD answers a bare 403 for both bad keys and a bucket we may not read; a GET says which.
    _call(url, client.list_objects_v2, Bucket=bucket, MaxKeys=1)


# ---------------------------------------------------------------- reads


def read_bytes(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """The whole file, or the byte range [start, end)."""
    if not is_s3(url):
        with open(url, "rb") as f:
            if start:
                f.seek(start)
            return f.read() if end is None else f.read(end - (start or 0))
    bucket, key = split_s3(url)
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if start is not None or end is not None:
        kwargs["Range"] = f"bytes={start or 0}-{'' if end is None else end - 1}"
    return _get_whole(url, kwargs)


def _get_whole(url: str, kwargs: dict[str, Any]) -> bytes:
    """GET an object (or range) and read all of its body; a body cut off mid-stream (botocore retries the
    request, not the read) is fetched again, up to AWS_MAX_ATTEMPTS times with a short backoff."""
    import time

    from botocore.exceptions import ConnectionClosedError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError

    attempts = max(1, s3_settings()["max_attempts"])
    for attempt in range(1, attempts + 1):
        body = _call(url, s3_client().get_object, **kwargs)["Body"]
        try:
            return body.read()
        except (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ConnectionClosedError) as exc:
            body.close()
            if attempt == attempts:
                raise _s3_error(exc, url) from exc
            time.sleep(min(0.05 * 2**attempt, 2.0))
    raise AssertionError("unreachable")


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def open_stream(url: str) -> IO[bytes]:
    """A forward-only binary stream (S3: the HTTP body, not buffered in memory)."""
    if not is_s3(url):
        return open(url, "rb")
    bucket, key = split_s3(url)
    return _call(url, s3_client().get_object, Bucket=bucket, Key=key)["Body"]


def download_file(url: str, local_path: str | Path) -> None:
    Path(local_path).parent.mkdir(parents=True, exist_ok=True)
    if not is_s3(url):
        shutil.copyfile(url, local_path)
        return
    bucket, key = split_s3(url)
    _call(url, s3_client().download_file, bucket, key, str(local_path))


def download_dir(url: str, local_dir: str | Path) -> list[Path]:
    """Copy every file under `url` into `local_dir`, keeping relative paths."""
    root = url.rstrip("/") + "/"
    out = []
    for file_url in list_files(url):
        dest = Path(local_dir) / file_url[len(root) :]
        download_file(file_url, dest)
        out.append(dest)
    return out


# ---------------------------------------------------------------- writes


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole file atomically (local: temp file + rename; S3: one PUT)."""
    if is_s3(url):
        bucket, key = split_s3(url)
        _call(url, s3_client().put_object, Bucket=bucket, Key=key, Body=data)
        return
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def upload_file(local_path: str | Path, url: str) -> None:
    """Copy a local file to `url`; S3 uploads above 64 MiB go multipart, in parallel parts."""
    if not is_s3(url):
        dest = Path(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, dest)
        return
    from boto3.s3.transfer import TransferConfig

    bucket, key = split_s3(url)
    cfg = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD // 4)
    _call(url, s3_client().upload_file, str(local_path), bucket, key, Config=cfg)


def upload_dir(local_dir: str | Path, url: str) -> list[str]:
    """Copy every file under `local_dir` to `url`, keeping relative paths."""
    out = []
    for path in sorted(Path(local_dir).rglob("*")):
        if path.is_file():
            dest = join(url, path.relative_to(local_dir).as_posix())
            upload_file(path, dest)
            out.append(dest)
    return out


def delete(url: str) -> None:
    if not is_s3(url):
        Path(url).unlink(missing_ok=True)
        return
    bucket, key = split_s3(url)
    _call(url, s3_client().delete_object, Bucket=bucket, Key=key)


def delete_prefix(url: str) -> int:
    """Remove every file under the folder/prefix `url`; returns how many."""
    files = list_files(url)
    if not is_s3(url):
        if Path(url).is_dir():
            shutil.rmtree(url)
        return len(files)
    bucket, _ = split_s3(url)
    for i in range(0, len(files), 1000):
        keys = [{"Key": split_s3(f)[1]} for f in files[i : i + 1000]]
        _call(url, s3_client().delete_objects, Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    return len(files)


def publish(folder: str, marker: str, content: bytes, required: Iterable[str] = ()) -> str:
    """Make a multi-file output complete: check `required` files exist under `folder`, then write the
    marker file last (atomically). Readers look for the marker; without it the folder is incomplete."""
    missing = [r for r in required if not exists(join(folder, r))]
    if missing:
        raise RuntimeError(f"cannot publish {folder}: {len(missing)} file(s) missing, e.g. {missing[0]}")
    url = join(folder, marker)
    write_bytes(url, content)
    return url
