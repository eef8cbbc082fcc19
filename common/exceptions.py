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


class UnknownModel(HepatoError):
    """A submission named a model that no worker serves."""


class ModelWeightsNotFound(HepatoError):
    """The weights file named in the settings does not exist (we never download)."""


class ObjectFetchError(HepatoError):
    """An image could not be read back from the object store."""


class LeaseLost(HepatoError):
    """A fenced write found that another worker now owns the job."""
