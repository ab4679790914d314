"""Input volumes and output uploads of an organic job, as strict pydantic models (the types
users of the peer compute market already know: inline zip, HTTP file, zip URL, Hugging Face
repo; HTTP PUT / POST uploads and a whole-output zip).

A job's inputs are mounted read-only under ``/volume/<path>``; its outputs under ``/output/``
are sent to URLs the user presigned. These models travel user -> validator-core -> agent, so
they are validated at every hop: unknown fields are refused (``extra="forbid"``), each type is
picked by its ``type`` tag, and the places where a hostile spec could hurt the miner are
checked here, before any byte moves:

* ``path`` fields must be relative, normalised paths inside the volume / output dir: no ``..``,
  no absolute paths, no NUL or control characters, no backslashes (a Windows-style
  ``..\\x`` is a filename on Linux, but nobody means that);
* URLs must be ``http(s)`` with a host (no ``file://``, ``ftp://`` or schemeless strings that a
  client library might interpret in surprising ways);
* upload headers cannot smuggle CR/LF or override the framing (Content-Length,
  Transfer-Encoding) that the uploader computes itself.

New fields must get defaults so that older specs keep validating.
"""

from __future__ import annotations

import base64
import binascii
import posixpath
import re
from typing import Annotated, Literal, Union
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PATH_MAX_CHARS = 1024
URL_MAX_CHARS = 8192
INLINE_ZIP_MAX_B64_CHARS = 12 * 1024 * 1024  # ~9 MiB of zip: bigger inputs belong behind a URL
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")
_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")
_FRAMING_HEADERS = {"content-length", "transfer-encoding", "host", "connection"}


def safe_relative_path(value: str, *, what: str = "path") -> str:
    """``value`` as a normalised relative POSIX path inside its root, or ValueError saying why.

    ``a//b/./c`` becomes ``a/b/c``; ``..`` anywhere, absolute paths, NUL/control characters,
    backslashes and the root itself (``""``, ``"."``) are refused.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty relative path")
    if len(value) > PATH_MAX_CHARS:
        raise ValueError(f"{what} is {len(value)} characters long; at most {PATH_MAX_CHARS}")
    if _CONTROL.search(value):
        raise ValueError(f"{what} {value!r} contains NUL or control characters")
    if "\\" in value:
        raise ValueError(f"{what} {value!r} contains a backslash; use '/' as the separator")
    if value.startswith("/"):
        raise ValueError(f"{what} {value!r} is absolute; give a path relative to the mount point")
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{what} {value!r} contains '..'; paths must stay inside the mount point")
    if not parts:
        raise ValueError(f"{what} {value!r} names the mount point itself; give a file or directory name")
    normal = "/".join(parts)
    assert posixpath.normpath(normal) == normal
    return normal


def check_url(value: str, *, what: str = "url") -> str:
    """``value`` if it is an absolute http(s) URL with a host, else ValueError saying why."""
    if len(value) > URL_MAX_CHARS:
        raise ValueError(f"{what} is {len(value)} characters long; at most {URL_MAX_CHARS}")
    if _CONTROL.search(value) or " " in value:
        raise ValueError(f"{what} contains whitespace or control characters; percent-encode them")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        got = parts.scheme + "://" if parts.scheme else repr(value[:16])
        raise ValueError(f"{what} must start with http:// or https://, not {got}")
    if not parts.hostname:
        raise ValueError(f"{what} has no host")
    return value


def redact_url(url: str) -> str:
    """scheme://host/path without userinfo, query or fragment: presigned URLs carry signatures."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}" + ("?..." if parts.query else "")


def _check_headers(value: dict[str, str], *, allow_content_type: bool = True) -> dict[str, str]:
    if len(value) > 64:
        raise ValueError(f"{len(value)} headers given; at most 64")
    for name, item in value.items():
        if not _HEADER_NAME.match(name):
            raise ValueError(f"header name {name!r} is not a valid HTTP token")
        if _CONTROL.search(item.replace("\t", " ")) or len(item) > 8192:
            raise ValueError(f"header {name} must be at most 8192 characters without CR, LF or control characters")
        lower = name.lower()
        if lower in _FRAMING_HEADERS:
            raise ValueError(f"header {name} is set by the uploader itself; remove it from the spec")
        if lower == "content-type" and not allow_content_type:
            raise ValueError("header Content-Type is set by the multipart encoder (it carries the boundary); "
                             "remove it, and put a file's content type in form_fields if the form expects one")
    return value


def _check_form_fields(value: dict[str, str]) -> dict[str, str]:
    if len(value) > 64:
        raise ValueError(f"{len(value)} form fields given; at most 64")
    for name, item in value.items():
        if not name or len(name) > 256 or "\x00" in name or "\x00" in item or len(item) > 65536:
            raise ValueError(f"form field {name[:64]!r}: names 1-256 characters, values at most 65536, no NUL")
        if name == "file":
            raise ValueError("form field 'file' is reserved for the uploaded file; remove it from form_fields")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _VolumeBase(_Strict):
    path: str = Field(description="where it appears, relative to /volume/")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return safe_relative_path(value, what="volume path")


class _UrlMixin(_Strict):
    url: str

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_url(value)


class InlineZipVolume(_VolumeBase):
    """A zip carried in the spec (base64), extracted into /volume/<path>/."""

    type: Literal["inline_zip"] = "inline_zip"
    contents_b64: str = Field(max_length=INLINE_ZIP_MAX_B64_CHARS, repr=False)

    @field_validator("contents_b64")
    @classmethod
    def _b64(cls, value: str) -> str:
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"contents_b64 is not valid base64 ({exc})") from None
        return value

    def zip_bytes(self) -> bytes:
        return base64.b64decode(self.contents_b64, validate=True)


class HttpFileVolume(_VolumeBase, _UrlMixin):
    """One file fetched with HTTP GET, stored as /volume/<path>."""

    type: Literal["http_file"] = "http_file"


class ZipUrlVolume(_VolumeBase, _UrlMixin):
    """A zip fetched with HTTP GET, extracted into /volume/<path>/."""

    type: Literal["zip_url"] = "zip_url"


class HuggingFaceVolume(_VolumeBase):
    """Files of a Hugging Face Hub repository at a revision, under /volume/<path>/."""

    type: Literal["huggingface"] = "huggingface"
    repo_id: str = Field(min_length=1, max_length=96)
    revision: str = Field(default="main", min_length=1, max_length=256)
    repo_type: Literal["model", "dataset", "space"] = "model"
    allow_patterns: list[str] | None = Field(default=None, max_length=256)
    token: str | None = Field(default=None, max_length=4096, repr=False)

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        if not _REPO_ID.match(value) or ".." in value or "--" in value or value.endswith(".git"):
            raise ValueError(f"repo_id {value!r} is not a Hub repository id like 'org/name' (letters, digits, "
                             "'-', '_', '.'; no '..' or '--')")
        return value

    @field_validator("revision", "token")
    @classmethod
    def _no_control(cls, value: str | None) -> str | None:
        if value is not None and (_CONTROL.search(value) or " " in value):
            raise ValueError("must not contain whitespace or control characters")
        return value

    @field_validator("allow_patterns")
    @classmethod
    def _patterns(cls, value: list[str] | None) -> list[str] | None:
        for pattern in value or []:
            if not pattern or len(pattern) > 512 or _CONTROL.search(pattern):
                raise ValueError(f"allow_patterns item {pattern[:64]!r}: 1-512 characters, no control characters")
        return value


Volume = Annotated[Union[InlineZipVolume, HttpFileVolume, ZipUrlVolume, HuggingFaceVolume],
                   Field(discriminator="type")]


def check_volume_layout(volumes: list[InlineZipVolume | HttpFileVolume | ZipUrlVolume | HuggingFaceVolume]) -> None:
    """ValueError if two volumes would land on the same path or one inside another."""
    seen: list[str] = []
    for vol in volumes:
        for other in seen:
            if vol.path == other or vol.path.startswith(other + "/") or other.startswith(vol.path + "/"):
                raise ValueError(f"volume paths {other!r} and {vol.path!r} overlap; give each volume its own directory")
        seen.append(vol.path)


class _UploadBase(_UrlMixin):
    headers: dict[str, str] = Field(default_factory=dict, description="sent as is (e.g. signed headers)")


class _FileUpload(_UploadBase):
    path: str = Field(description="the file to upload, relative to /output/")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return safe_relative_path(value, what="upload path")


class PutUpload(_FileUpload):
    """HTTP PUT of /output/<path> as the raw body (S3 presigned PUT)."""

    type: Literal["put"] = "put"

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_headers(value)


class PostUpload(_FileUpload):
    """HTTP POST multipart form: ``form_fields`` first, then the file as field ``file`` (S3 presigned POST)."""

    type: Literal["post"] = "post"
    form_fields: dict[str, str] = Field(default_factory=dict)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_headers(value, allow_content_type=False)

    @field_validator("form_fields")
    @classmethod
    def _fields(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_form_fields(value)


class ZipUpload(_UploadBase):
    """A zip of the whole /output directory, sent with PUT (raw body) or POST (multipart, field ``file``)."""

    type: Literal["zip"] = "zip"
    method: Literal["PUT", "POST"] = "PUT"
    form_fields: dict[str, str] = Field(default_factory=dict)
    filename: str = Field(default="output.zip", min_length=1, max_length=255, pattern=r"^[^/\\\x00-\x1f]+$")

    @field_validator("form_fields")
    @classmethod
    def _fields(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_form_fields(value)

    @model_validator(mode="after")
    def _headers(self) -> "ZipUpload":
        # after the model, not per field: ``headers`` (inherited) is validated before ``method``
        _check_headers(self.headers, allow_content_type=self.method == "PUT")
        return self


Upload = Annotated[Union[PutUpload, PostUpload, ZipUpload], Field(discriminator="type")]

ZIP_RESPONSE_PATH = "*"
"""``UploadResponse.path`` of a :class:`ZipUpload`: the whole output directory."""


class UploadResponse(_Strict):
    """What the upload target answered; returned to the user in the job result."""

    path: str = Field(description="the uploaded file relative to /output/, or '*' for the whole-output zip")
    status_code: int
    headers: dict[str, str] = Field(default_factory=dict)
    body: str = Field(default="", description="the response body (UTF-8, invalid bytes replaced), capped")
    body_truncated: bool = False
    bytes_sent: int = 0
