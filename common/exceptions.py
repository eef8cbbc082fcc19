"""Every exception HepatoAI raises on purpose, in one flat module (as rq does)."""


class HepatoError(Exception):
    """Base class."""


class InvalidImage(HepatoError):
    """An upload is not an image we accept; the message names the reason."""

    status_code = 422


class UnsupportedImageFormat(InvalidImage):
    status_code = 415


class ImageTooLarge(InvalidImage):
    status_code = 413


class UploadRefused(InvalidImage):
    """A direct upload that cannot be committed (gateway.direct): not found (never put,
    or another tenant's), or its commit window closed. ``status_code`` per instance."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class UnknownModel(HepatoError):
    """A submission named a model that no worker serves."""


class QueueFull(HepatoError):
    """A model's queue holds its maximum of pending jobs; nothing of the request is kept."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CallbackRefused(HepatoError):
    """A webhook callback_url that may not be called: malformed, too long, or a host
    that resolves to a loopback, link-local, private or the stack's own address and is
    not in HEPATO_WEBHOOK_ALLOWED_HOSTS. The message names the reason."""


class ModelWeightsNotFound(HepatoError):
    """The weights a manifest names do not exist (we never download)."""


class InvalidManifest(HepatoError):
    """A model manifest is malformed; the message names the file and every problem."""


class BackendError(HepatoError):
    """A model runtime cannot be used as installed or configured (the message says why)."""


class ModelUnavailable(HepatoError):
    """The server a model runs on (Triton) cannot be reached now, after retries: the
    microbatch goes back to the queue whole, as for a store outage; no image is to blame."""


class ObjectFetchError(HepatoError):
    """An image could not be read back from the object store."""


class ObjectMissing(ObjectFetchError):
    """The image is gone from the object store (deleted, or a wrong bucket): retrying
    cannot help."""


class LeaseLost(HepatoError):
    """A fenced write found that another worker now owns the job."""


class BenchFailed(HepatoError):
    """A ``hepato bench e2e`` scenario could not finish (a process died, a timeout, a
    refused request); the message names the scenario."""

    def __init__(self, scenario: str, message: str) -> None:
        super().__init__(f"scenario {scenario}: {message}")
        self.scenario = scenario


class InvalidSlide(HepatoError):
    """A file is not a whole-slide image we can read; the message names the reason."""

    status_code = 422


class UnsupportedSlideFormat(InvalidSlide):
    """Not a pyramidal slide: an ordinary image, a single-level or stripped TIFF, a
    DICOM file that is not a whole-slide image, or no format we know."""

    status_code = 415


class TruncatedSlide(InvalidSlide):
    """The file ends before the structure it declares (an interrupted upload or copy)."""
