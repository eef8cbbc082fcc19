"""The object store (MinIO in production, SeaweedFS locally) behind a small interface."""

from __future__ import annotations

import io
import logging
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import MinioException, S3Error

from hepato.common.exceptions import ObjectFetchError, ObjectMissing
from hepato.common.settings import Settings

log = logging.getLogger(__name__)


def new_object_key(image_format: str) -> str:
    """Server-generated key: client filenames never reach the store's namespace."""
    day = datetime.now(UTC).strftime("%Y/%m/%d")
    return f"uploads/{day}/{uuid.uuid4().hex}.{image_format}"


class ObjectStore:
    def __init__(self, settings: Settings, pool_size: int = 32) -> None:
        self.bucket = settings.s3_bucket
        # Short timeouts and a pool large enough for concurrent fetches; urllib3's default
        # pool of 10 would serialise a 16-wide microbatch download.
        http = urllib3.PoolManager(
            maxsize=pool_size,
            timeout=urllib3.Timeout(connect=5.0, read=30.0),
            retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503]),
        )
        self.client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=settings.s3_secure,
            region=settings.s3_region,
            http_client=http,
        )
        # Presigned links name the address clients reach (s3_public_endpoint). SigV4 signs
        # the Host header, so a link signed for the internal host cannot just be rewritten:
        # a second client signs for the public one. It never connects: presigning is
        # local, and the explicit region spares it the GetBucketLocation call it would
        # otherwise send to the public address (which the services may not reach).
        public = settings.s3_public_endpoint
        secure = settings.s3_public_secure
        if public or secure is not None:
            self.signer = Minio(
                public or settings.s3_endpoint,
                access_key=settings.s3_access_key,
                secret_key=settings.s3_secret_key,
                secure=settings.s3_secure if secure is None else secure,
                region=settings.s3_region,
            )
        else:
            self.signer = self.client

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:  # another process created it first
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.put_file(key, io.BytesIO(data), len(data), content_type)

    def put_file(self, key: str, file: BinaryIO, length: int, content_type: str) -> None:
        """Store ``length`` bytes of ``file`` from its current position, never holding
        the whole file: the client reads a part (5 MiB; a larger object goes up as a
        multipart upload) and sends it before reading the next. One part in flight, not
        minio's default three, so that is all one upload holds; concurrency comes from
        uploading a request's files side by side."""
        self.client.put_object(
            self.bucket,
            key,
            file,
            length=length,
            content_type=content_type,
            num_parallel_uploads=1,
        )

    def put_path(self, key: str, path: Path, content_type: str) -> None:
        """Store the file at ``path`` (a slide's de-identified copy), streamed."""
        with open(path, "rb") as f:
            self.put_file(key, f, path.stat().st_size, content_type)

    def download_to(self, key: str, path: Path, chunk_bytes: int = 64 * 1024 * 1024) -> int:
        """Copy the object to ``path`` with ranged reads of ``chunk_bytes``, so a slide of
        several GB is never in memory and a broken connection costs one range, not the
        whole file. Errors as for ``get``; returns the size."""
        size = self._stat_size(key)
        with open(path, "wb") as out:
            offset = 0
            while offset < size:
                length = min(chunk_bytes, size - offset)
                out.write(self._range(key, offset, length))
                offset += length
        return size

    def _stat_size(self, key: str) -> int:
        try:
            return int(self.client.stat_object(self.bucket, key).size or 0)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket", "ResourceNotFound"):
                raise ObjectMissing(
                    f"the uploaded slide is gone from the object store ({exc.code}: {key})"
                ) from exc
            raise ObjectFetchError(f"object {key!r}: {exc.code}") from exc
        except (urllib3.exceptions.HTTPError, MinioException) as exc:
            raise ObjectFetchError(f"object {key!r}: object store unreachable ({exc})") from exc

    def _range(self, key: str, offset: int, length: int) -> bytes:
        try:
            response = self.client.get_object(self.bucket, key, offset=offset, length=length)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket"):
                raise ObjectMissing(f"the object is gone ({exc.code}: {key})") from exc
            raise ObjectFetchError(f"object {key!r}: {exc.code}") from exc
        except (urllib3.exceptions.HTTPError, MinioException) as exc:
            raise ObjectFetchError(f"object {key!r}: object store unreachable ({exc})") from exc
        try:
            data = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ObjectFetchError(f"object {key!r}: its download broke off ({exc})") from exc
        finally:
            response.close()
            response.release_conn()
        if len(data) != length:
            raise ObjectFetchError(f"object {key!r}: a range read returned {len(data)} bytes")
        return data

    def get(self, key: str) -> bytes:
        """The object's bytes. A missing object is ObjectMissing (permanent: its job
        fails); any other failure, of the request or of reading the body, is
        ObjectFetchError (transient: its job is retried), so that one object's trouble
        is charged to its own job, never to the whole microbatch."""
        try:
            response = self.client.get_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket"):
                raise ObjectMissing(
                    f"the uploaded image is gone from the object store ({exc.code}: {key})"
                ) from exc
            raise ObjectFetchError(f"object {key!r}: {exc.code}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise ObjectFetchError(f"object {key!r}: object store unreachable ({exc})") from exc
        except MinioException as exc:  # an answer that is not S3's (a proxy's error page)
            raise ObjectFetchError(
                f"object {key!r}: the object store answered {type(exc).__name__}"
            ) from exc
        try:
            return response.read()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ObjectFetchError(f"object {key!r}: its download broke off ({exc})") from exc
        finally:
            response.close()
            response.release_conn()

    def remove(self, keys: list[str]) -> None:
        """Delete objects no job will ever name (a refused submission's), best effort:
        one left behind is an orphan, never a lost job."""
        try:
            for error in self.client.remove_objects(self.bucket, (DeleteObject(k) for k in keys)):
                log.warning("could not delete %s: %s", error.name, error.message)
        except Exception:
            log.warning("could not delete %d objects", len(keys), exc_info=True)

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, key)
        except S3Error:
            return False
        return True

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        """A GET link for clients, at the public address when one is set."""
        return self.signer.presigned_get_object(
            self.bucket, key, expires=timedelta(seconds=expires_s)
        )

    def presigned_put_url(self, key: str, expires_s: int) -> str:
        """A PUT link for a client's own upload (gateway.direct), at the public address
        when one is set, like ``presigned_url``."""
        return self.signer.presigned_put_object(
            self.bucket, key, expires=timedelta(seconds=expires_s)
        )

    def read_range(self, key: str, offset: int, length: int) -> tuple[bytes, int, str]:
        """Up to ``length`` bytes of the object from ``offset`` (fewer at its end), its
        whole size (from Content-Range: no separate STAT) and its Content-Type. An empty
        object is (b"", 0, ...); errors as for ``get``."""
        try:
            response = self.client.get_object(self.bucket, key, offset=offset, length=length)
        except S3Error as exc:
            if exc.code == "InvalidRange" and offset == 0:
                return b"", 0, ""  # S3 answers 416 to any range of an empty object
            if exc.code in ("NoSuchKey", "NoSuchBucket"):
                raise ObjectMissing(f"no object {key!r} ({exc.code})") from exc
            raise ObjectFetchError(f"object {key!r}: {exc.code}") from exc
        except (urllib3.exceptions.HTTPError, MinioException) as exc:
            raise ObjectFetchError(f"object {key!r}: object store unreachable ({exc})") from exc
        try:
            data = response.read()
            total = response.headers.get("Content-Range", "").rpartition("/")[2]
            size = int(total) if total.isdigit() else offset + len(data)
            return data, size, response.headers.get("Content-Type", "")
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ObjectFetchError(f"object {key!r}: its download broke off ({exc})") from exc
        finally:
            response.close()
            response.release_conn()

    def ping(self) -> bool:
        """Reachable and the bucket exists (made here if the store was down at start)."""
        try:
            self.ensure_bucket()
        except Exception:
            return False
        return True
