"""Where a model repository lives: a local folder or an S3 (or S3-compatible) prefix, behind one small interface.

Keys are '/'-separated paths relative to the repository root (`<model>/config.pbtxt`, `<model>/<v>/model.onnx`).
`write` replaces one object atomically (local: a temporary file and os.replace; S3: one PUT). The publish state
and the lock live beside the repository, never inside it (Triton would take a folder there for a model):
`<parent>/.<name>.publish/` locally, `<prefix's parent>/.<prefix's name>.publish/` in a bucket.

S3: boto3 with the standard credential chain; the endpoint from `--s3-endpoint` or AWS_ENDPOINT_URL (boto3 reads
it); a short connect timeout and two attempts, so an endpoint that is down is one quick error line. The lock is
an object created with a conditional PUT (If-None-Match: *) that holds its owner and a lease; a holder renews the
lease while it works, and a lock whose lease ran out (its holder died) is taken over with a conditional DELETE
(If-Match: the ETag that was read), so two waiters cannot both take it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from packager.console import say
from packager.errors import PackagerError, UsageError, first_line

S3_SCHEME = "s3://"
LEASE_S = 120.0  # an S3 lock whose holder stopped renewing it for this long is taken over
LEASE_VARIABLE = "PACKAGER_S3_LEASE_S"  # overrides LEASE_S
LOCK_POLL_S = 1.0


class Store(Protocol):
    """A model repository's objects, by key."""

    url: str  # for messages: the folder or s3://bucket/prefix

    def read(self, key: str) -> bytes | None: ...

    def write(self, key: str, data: bytes) -> None: ...

    def upload(self, key: str, source: Path) -> None: ...

    def sizes(self, prefix: str = "") -> dict[str, int]: ...

    def sha256(self, key: str) -> str: ...

    def delete(self, keys: Iterable[str]) -> None: ...

    def models(self) -> list[str]: ...

    def lock(self) -> AbstractContextManager[None]: ...

    def read_state(self, name: str) -> bytes | None: ...

    def write_state(self, name: str, data: bytes) -> None: ...

    def clear_state(self, name: str) -> None: ...


def is_s3(url: str | Path) -> bool:
    return str(url).startswith(S3_SCHEME)


def open_store(url: str | Path, endpoint: str | None = None) -> Store:
    """The store of a repository argument: s3://bucket/prefix or a local folder."""
    if is_s3(url):
        return S3Store(str(url), endpoint)
    return LocalStore(Path(url))


# ---- local ---------------------------------------------------------------------------------------------------------


class LocalStore:
    """A repository folder; its state folder (and flock) is the one local publish uses."""

    def __init__(self, root: Path):
        self.root = root.absolute()
        self.url = str(root)
        self.workspace = self.root.parent / f".{self.root.name}.publish"

    def _path(self, key: str) -> Path:
        return self.root / key

    def read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)

    def upload(self, key: str, source: Path) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)

    def sizes(self, prefix: str = "") -> dict[str, int]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return {}
        return {str(p.relative_to(self.root)): p.stat().st_size for p in sorted(base.rglob("*")) if p.is_file()}

    def sha256(self, key: str) -> str:
        from packager.record import sha256

        return sha256(self._path(key))

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def remove_folder(self, prefix: str) -> None:
        """A version folder disappears in one rename (out of the repository), then is deleted."""
        folder = self._path(prefix.rstrip("/"))
        if not folder.exists():
            return
        self.workspace.mkdir(parents=True, exist_ok=True)
        doomed = Path(tempfile.mkdtemp(prefix="pruned-", dir=self.workspace))
        folder.rename(doomed / folder.name)
        shutil.rmtree(doomed)

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/config.pbtxt"))

    @contextmanager
    def lock(self) -> Iterator[None]:
        from packager.repository import locked

        self.workspace.mkdir(parents=True, exist_ok=True)
        with locked(self.workspace, self.root):
            yield

    def read_state(self, name: str) -> bytes | None:
        try:
            return (self.workspace / name).read_bytes()
        except FileNotFoundError:
            return None

    def write_state(self, name: str, data: bytes) -> None:
        self.workspace.mkdir(parents=True, exist_ok=True)
        temporary = self.workspace / f"{name}.tmp"
        temporary.write_bytes(data)
        os.replace(temporary, self.workspace / name)

    def clear_state(self, name: str) -> None:
        (self.workspace / name).unlink(missing_ok=True)


# ---- S3 ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    """The S3 lock object's body."""

    owner: str
    expires: float  # time.time() after which the lock may be taken over

    def encode(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": self.expires}).encode()

    @classmethod
    def decode(cls, data: bytes) -> "Lease | None":
        try:
            value = json.loads(data)
            return cls(str(value["owner"]), float(value["expires"]))
        except (ValueError, KeyError, TypeError):
            return None


class S3Store:
    """s3://bucket/prefix through boto3."""

    def __init__(self, url: str, endpoint: str | None = None):
        bucket, _, prefix = url[len(S3_SCHEME):].partition("/")
        prefix = prefix.strip("/")
        if not bucket or not prefix:
            raise UsageError(f"{url}: use s3://BUCKET/PREFIX (the publish state lives beside PREFIX, so it cannot be "
                             "the bucket's root)")
        self.url = f"{S3_SCHEME}{bucket}/{prefix}"
        self.bucket, self.prefix = bucket, prefix
        parent, _, name = prefix.rpartition("/")
        self.state_prefix = f"{parent + '/' if parent else ''}.{name}.publish/"
        self.lease_s = float(os.environ.get(LEASE_VARIABLE) or LEASE_S)
        self._endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
        self._client = _client(self._endpoint)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}"

    def _call(self, operation: str, **kwargs):
        try:
            return getattr(self._client, operation)(Bucket=self.bucket, **kwargs)
        except Exception as exc:  # botocore's many exception types: each becomes one line
            raise s3_error(exc, self.url, self._endpoint) from None

    def read(self, key: str) -> bytes | None:
        return self._get(self._key(key))

    def _get(self, full_key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self._client.get_object(Bucket=self.bucket, Key=full_key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise s3_error(exc, self.url, self._endpoint) from None
        except Exception as exc:
            raise s3_error(exc, self.url, self._endpoint) from None

    def write(self, key: str, data: bytes) -> None:
        self._call("put_object", Key=self._key(key), Body=data)

    def upload(self, key: str, source: Path) -> None:
        with source.open("rb") as handle:
            self._call("put_object", Key=self._key(key), Body=handle)

    def _list(self, full_prefix: str, delimiter: str | None = None) -> Iterator[dict]:
        token = None
        while True:
            kwargs = {"Prefix": full_prefix, **({"Delimiter": delimiter} if delimiter else {}),
                      **({"ContinuationToken": token} if token else {})}
            page = self._call("list_objects_v2", **kwargs)
            yield page
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def sizes(self, prefix: str = "") -> dict[str, int]:
        base = f"{self.prefix}/"
        found = {}
        for page in self._list(base + prefix):
            for item in page.get("Contents", []):
                found[item["Key"][len(base):]] = item["Size"]
        return found

    def sha256(self, key: str) -> str:
        body = self._call("get_object", Key=self._key(key))["Body"]
        digest = hashlib.sha256()
        for chunk in iter(lambda: body.read(1 << 20), b""):
            digest.update(chunk)
        return digest.hexdigest()

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:  # one at a time, in the order given (prune deletes model.py last)
            self._call("delete_object", Key=self._key(key))

    def models(self) -> list[str]:
        base = f"{self.prefix}/"
        names = []
        for page in self._list(base, delimiter="/"):
            names += [item["Prefix"][len(base):].rstrip("/") for item in page.get("CommonPrefixes", [])]
        return sorted(name for name in names if self.read(f"{name}/config.pbtxt") is not None)

    def read_state(self, name: str) -> bytes | None:
        return self._get(self.state_prefix + name)

    def write_state(self, name: str, data: bytes) -> None:
        self._call("put_object", Key=self.state_prefix + name, Body=data)

    def clear_state(self, name: str) -> None:
        self._call("delete_object", Key=self.state_prefix + name)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the lock object (created only where none exists), renewing its lease until released."""
        key = self.state_prefix + "lock"
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        held = {"etag": self._acquire(key, owner)}
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(key, owner, held, stop), daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            self._release(key, held["etag"])

    def _acquire(self, key: str, owner: str) -> str:
        from botocore.exceptions import ClientError

        waiting = False
        while True:
            try:
                body = Lease(owner, time.time() + self.lease_s).encode()
                return self._client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code not in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise s3_error(exc, self.url, self._endpoint) from None
            except Exception as exc:
                raise s3_error(exc, self.url, self._endpoint) from None
            held = self._head(key)
            if held is not None:
                lease, etag = held
                if lease is None or lease.expires < time.time():
                    say(f"    taking over the lock of {self.url}: its lease ran out ({lease.owner if lease else '?'})")
                    try:
                        self._client.delete_object(Bucket=self.bucket, Key=key, IfMatch=etag)
                    except ClientError:
                        pass  # someone else took it over first
                    continue
                if not waiting:
                    say(f"    waiting for another publish to {self.url} to finish ({lease.owner})")
                    waiting = True
            time.sleep(LOCK_POLL_S)

    def _head(self, key: str) -> tuple[Lease | None, str] | None:
        from botocore.exceptions import ClientError

        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=key)
        except ClientError:
            return None  # released meanwhile
        return Lease.decode(answer["Body"].read()), answer["ETag"]

    def _renew(self, key: str, owner: str, held: dict[str, str], stop: threading.Event) -> None:
        while not stop.wait(self.lease_s / 4):
            try:
                answer = self._client.put_object(Bucket=self.bucket, Key=key, IfMatch=held["etag"],
                                                 Body=Lease(owner, time.time() + self.lease_s).encode())
                held["etag"] = answer["ETag"]
            except Exception:  # noqa: BLE001 the next renewal tries again; a lost lock shows in the next publish
                pass

    def _release(self, key: str, etag: str) -> None:
        """Delete the lock object only while it is still ours (If-Match: the ETag of our last write)."""
        from botocore.exceptions import ClientError

        try:
            self._client.delete_object(Bucket=self.bucket, Key=key, IfMatch=etag)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "PreconditionFailed":
                raise s3_error(exc, self.url, self._endpoint) from None
            say(f"    the lock of {self.url} was taken over while this publish held it (its lease ran out)")
        except Exception as exc:
            raise s3_error(exc, self.url, self._endpoint) from None


def _client(endpoint: str | None):
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=2, read_timeout=60, retries={"max_attempts": 2, "mode": "standard"})
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None, config=config)


def s3_error(exc: Exception, url: str, endpoint: str | None) -> PackagerError:
    """One line for what goes wrong talking to S3: no credentials, no bucket, access denied, endpoint down."""
    from botocore import exceptions

    where = f" at {endpoint}" if endpoint else ""
    if isinstance(exc, exceptions.NoCredentialsError | exceptions.PartialCredentialsError):
        return PackagerError(f"no AWS credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                             "AWS_PROFILE, or another source of the standard AWS chain")
    if isinstance(exc, exceptions.EndpointConnectionError | exceptions.ConnectTimeoutError):
        return PackagerError(f"cannot reach the S3 endpoint{where or ' of ' + url} (is it up? AWS_ENDPOINT_URL or "
                             f"--s3-endpoint name it): {first_line(exc)}")
    if isinstance(exc, exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return PackagerError(f"bucket '{url[len(S3_SCHEME):].split('/')[0]}' does not exist{where}")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AllAccessDisabled"):
            return PackagerError(f"access denied to {url}{where} ({code}): check the credentials and the bucket's "
                                 "policy")
        return PackagerError(f"S3 refused a request on {url}{where}: {code}: {first_line(exc)}")
    if isinstance(exc, exceptions.BotoCoreError):
        return PackagerError(f"S3 error on {url}{where}: {first_line(exc)}")
    return PackagerError(f"S3 error on {url}{where}: {type(exc).__name__}: {first_line(exc)}")

