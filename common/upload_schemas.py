"""Request and response bodies of direct uploads (``/v1/uploads``): the client asks for
presigned PUT URLs, puts each file on its own, then commits the keys as a batch or a job.

Kept apart from common.schemas so that the multipart API's shapes stay as they were, and
the client SDK reads these without the gateway."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, model_validator

from hepato.common.constants import Priority

# As the multipart routes' deadline_s: past a year the timestamp arithmetic overflows.
MAX_DEADLINE_S = 365 * 24 * 3600


class UploadFileSpec(BaseModel):
    """What the client knows of one file before it uploads it (both optional)."""

    model_config = ConfigDict(extra="forbid")

    size: int | None = Field(None, ge=0, description="Bytes; over the limit is refused now")
    content_type: str | None = Field(
        None, max_length=255, description="As the client will send it; an image type, if given"
    )


class UploadsRequest(BaseModel):
    """``count`` files, or one entry per file in ``files``: not both."""

    model_config = ConfigDict(extra="forbid")

    count: int | None = Field(None, ge=1, description="How many files will be put")
    files: list[UploadFileSpec] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_of(self) -> UploadsRequest:
        if (self.count is None) == (self.files is None):
            raise ValueError("give either count or files, not both")
        return self

    def specs(self) -> list[UploadFileSpec]:
        return self.files if self.files is not None else [UploadFileSpec()] * (self.count or 0)


class UploadTicket(BaseModel):
    key: str = Field(description="The object key to name in the commit")
    url: str = Field(description="Presigned: PUT the file's bytes here, no other header needed")
    method: Literal["PUT"] = "PUT"
    expires_at: datetime = Field(description="The URL works until then")


class UploadsSigned(BaseModel):
    uploads: list[UploadTicket]
    expires_in_s: int
    commit_by: datetime = Field(
        description="Commit these keys before then (POST /v1/uploads/batches or /jobs); "
        "an upload not committed by then is deleted"
    )
    max_file_bytes: int


class StagedFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=255, description="A key from POST /v1/uploads")
    filename: str | None = Field(
        None, max_length=1024, description="Shown with the job; default the key"
    )


class CommitOptions(BaseModel):
    """The options of a submission, as the multipart routes take them as form fields."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Model name; default from settings")
    priority: Priority = Priority.routine
    deadline_s: float | None = Field(None, gt=0, le=MAX_DEADLINE_S)
    question: str | None = Field(None, min_length=1, max_length=2000)
    callback_url: AnyHttpUrl | None = None


class CommitBatch(CommitOptions):
    uploads: list[StagedFile] = Field(min_length=1)


class CommitJob(CommitOptions):
    upload: StagedFile
