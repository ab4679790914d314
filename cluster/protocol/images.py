"""Image references, the validator's image allow/deny policy, and the GPU toolkit check (issue 3).

- :func:`parse_reference` splits ``[domain/]path[:tag][@sha256:<64 hex>]`` by Docker's reference
  grammar (distribution/reference) and refuses anything else with :class:`InvalidImageReference`.
- :class:`ImagePolicy` is validator-side: glob patterns (``fnmatch``, case-sensitive; ``*`` also
  matches ``/``, ``:`` and ``@``) over the reference as written, its familiar form and its fully
  qualified form (``docker.io/library/busybox:latest``). A deny rule wins over an allow rule; an
  empty allow list allows every image that no deny rule names.
- :func:`check_gpu_support` refuses GPU jobs unless the NVIDIA container toolkit is at least
  1.17.8: older releases have known container escapes (CVE-2024-0132 fixed in 1.16.2,
  CVE-2025-23359 in 1.17.4, CVE-2025-23266 "NVIDIAScape" in 1.17.8).

The pull itself (digest check, limit, registry credentials) is ``DockerRuntime.pull``.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from typing import NamedTuple

from cluster.miner.runtime import ImageUnavailable
from cluster.errors import EngineError, ExternalError, InvalidSpec, Refused

MIN_TOOLKIT_VERSION = (1, 17, 8)
DEFAULT_DOMAIN = "docker.io"


# ------------------------------------------------------------------------------------ errors
class InvalidImageReference(InvalidSpec):
    """An image reference that Docker's grammar does not accept."""


class ImageDenied(Refused):
    """validator-core's image policy refuses this image (reason ``image_denied``)."""

    def __init__(self, reason: str, message: str, *, status_code: int | None = 403) -> None:
        super().__init__(reason, message, status_code=status_code)


class ImagePullFailed(ImageUnavailable, ExternalError):
    """The image could not be pulled or did not match its digest.

    ``reason``: ``image_pull_failed`` | ``image_pull_timed_out`` | ``image_digest_mismatch``.
    A subclass of :class:`ImageUnavailable`, so code that catches that still catches this.
    """

    stage = "image_pull"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class GpuUnsupported(EngineError):
    """This miner cannot run GPU jobs safely.

    ``reason``: ``gpu_toolkit_missing`` | ``gpu_toolkit_too_old``. An :class:`EngineError` (the
    miner's setup, not the job, is at fault).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


# -------------------------------------------------------------------------------- references
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = re.compile(rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*\Z")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?\Z")
_TAG = re.compile(r"[\w][\w.-]{0,127}\Z")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}\Z")
_NAME_MAX = 255


class Reference(NamedTuple):
    """``parse_reference("127.0.0.1:55000/rh/busybox:v1@sha256:ab…")`` →
    ``Reference(repository="127.0.0.1:55000/rh/busybox", tag="v1", digest="sha256:ab…")``.
    ``tag`` / ``digest`` are None when absent (no implicit ``latest``)."""

    repository: str
    tag: str | None
    digest: str | None

    @property
    def domain(self) -> str:
        return split_domain(self.repository)[0]

    def pull_name(self) -> str:
        """What dockerd is asked for: by digest when there is one (a tag beside a digest is
        ignored by dockerd as it is by ``docker pull``), else by tag, else ``latest``."""
        if self.digest:
            return f"{self.repository}@{self.digest}"
        return f"{self.repository}:{self.tag or 'latest'}"


def split_domain(repository: str) -> tuple[str, str]:
    """``("docker.io", "library/busybox")`` for ``busybox``; Docker's rule: the first component is
    a registry when it has a ``.`` or a ``:``, is ``localhost`` or has an upper-case letter."""
    first, sep, rest = repository.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        domain, path = ("docker.io" if first == "index.docker.io" else first), rest
    else:
        domain, path = DEFAULT_DOMAIN, repository
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = f"library/{path}"
    return domain, path


def normalize_repository(repository: str) -> str:
    """Fully qualified: ``busybox`` → ``docker.io/library/busybox``."""
    domain, path = split_domain(repository)
    return f"{domain}/{path}"


def familiar_repository(repository: str) -> str:
    """Short form, as ``docker images`` shows it: ``docker.io/library/busybox`` → ``busybox``."""
    domain, path = split_domain(repository)
    if domain != DEFAULT_DOMAIN:
        return f"{domain}/{path}"
    return path.removeprefix("library/") if path.count("/") == 1 and path.startswith("library/") else path


def parse_reference(image: str) -> Reference:
    """Split an image reference into (repository, tag, digest); raise :class:`InvalidImageReference`."""
    def bad(why: str) -> InvalidImageReference:
        return InvalidImageReference(f"image reference {image!r} is malformed: {why}; expected "
                                     "[registry[:port]/]name[:tag][@sha256:<64 hex digits>]")

    if not isinstance(image, str) or not image or image != image.strip() or any(c.isspace() for c in image):
        raise bad("empty or contains whitespace")
    rest, at, digest = image.partition("@")
    if at:
        if not _DIGEST.match(digest):
            raise bad(f"digest {digest!r} is not sha256: followed by 64 lower-case hex digits")
    else:
        digest = None
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG.match(tag):
            raise bad(f"tag {tag!r} must be 1-128 of [A-Za-z0-9_.-], not starting with . or -")
    repository = rest
    if not repository:
        raise bad("no repository name")
    if len(repository) > _NAME_MAX:
        raise bad(f"repository name longer than {_NAME_MAX} characters")
    components = repository.split("/")
    first = components[0]
    if len(components) > 1 and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        if not _DOMAIN.match(first):
            raise bad(f"registry {first!r} is not a host name with an optional :port")
        components = components[1:]
    for comp in components:
        if not _PATH_COMPONENT.match(comp):
            raise bad(f"name component {comp!r} must be lower-case letters and digits, separated by . _ __ or -")
    return Reference(repository, tag, digest)


def reference_forms(image: str) -> list[str]:
    """The spellings a policy pattern is matched against: as written, familiar, fully qualified."""
    ref = parse_reference(image)
    suffix = (f":{ref.tag}" if ref.tag else "") + (f"@{ref.digest}" if ref.digest else "")
    implicit = suffix if (ref.tag or ref.digest) else ":latest"
    forms = [image, familiar_repository(ref.repository) + implicit, normalize_repository(ref.repository) + implicit]
    return list(dict.fromkeys(forms))


def digest_matches(repo_digests: Iterable[str] | None, repository: str, digest: str) -> bool:
    """Whether an image's ``RepoDigests`` record ``repository@digest`` (names compared fully qualified)."""
    want = normalize_repository(repository)
    for entry in repo_digests or ():
        name, at, got = entry.rpartition("@")
        if at and got == digest and normalize_repository(name) == want:
            return True
    return False


# ------------------------------------------------------------------------------------ policy
class ImagePolicy:
    """Validator-side allow/deny list of image reference globs (deny wins; empty allow = all)."""

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self.allow = list(allow)
        self.deny = list(deny)
        for pattern in (*self.allow, *self.deny):
            if not isinstance(pattern, str) or not pattern.strip():
                raise ValueError(f"image policy patterns must be non-empty strings, got {pattern!r}")

    def check(self, image: str) -> None:
        """Return if ``image`` may run; raise :class:`ImageDenied` naming the rule, or
        :class:`InvalidImageReference` when it is not a valid reference."""
        forms = reference_forms(image)
        for pattern in self.deny:
            for form in forms:
                if fnmatch.fnmatchcase(form, pattern):
                    shown = "" if form == image else f" (as {form})"
                    raise ImageDenied("image_denied", f"image {image!r}{shown} is denied by the validator's "
                                      f"image_deny rule {pattern!r}; use another image")
        if not self.allow:
            return
        for pattern in self.allow:
            if any(fnmatch.fnmatchcase(form, pattern) for form in forms):
                return
        raise ImageDenied("image_denied", f"image {image!r} matches no rule of the validator's image_allow list "
                          f"{self.allow}; use an image the list allows")

    def allows(self, image: str) -> bool:
        try:
            self.check(image)
        except (ImageDenied, InvalidImageReference):
            return False
        return True


# ----------------------------------------------------------------------------- GPU toolkit
class ToolkitVersion(NamedTuple):
    major: int
    minor: int
    patch: int
    pre: str = ""  # "rc.1" for 1.17.8-rc.1: a pre-release is older than its release

    def at_least(self, minimum: tuple[int, ...]) -> bool:
        base = (self.major, self.minor, self.patch)
        want = tuple(minimum) + (0,) * (3 - len(minimum))
        return base > want if self.pre else base >= want

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}" + (f"-{self.pre}" if self.pre else "")


_VERSION = re.compile(r"version:?\s+v?(\d+)\.(\d+)\.(\d+)(?:[-~+]?((?:rc|alpha|beta|dev|pre)[\w.]*))?", re.I)

# Each binary of the toolkit a docker `device_requests` run goes through; the oldest one found counts.
TOOLKIT_PROBES = ("nvidia-ctk", "nvidia-container-toolkit", "nvidia-container-runtime-hook", "nvidia-container-cli")


def parse_toolkit_version(text: str) -> ToolkitVersion | None:
    """``NVIDIA Container Toolkit CLI version 1.17.8`` / ``cli-version: 1.17.8`` → (1, 17, 8)."""
    m = _VERSION.search(text or "")
    if m is None:
        return None
    return ToolkitVersion(int(m[1]), int(m[2]), int(m[3]), (m[4] or "").lower())


def toolkit_versions() -> dict[str, ToolkitVersion | None]:
    """``{path: version or None if unreadable}`` for each toolkit binary on PATH."""
    found: dict[str, ToolkitVersion | None] = {}
    for name in TOOLKIT_PROBES:
        path = shutil.which(name)
        if path is None or path in found:
            continue
        try:
            proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10,
                                  stdin=subprocess.DEVNULL)
            found[path] = parse_toolkit_version(proc.stdout + "\n" + proc.stderr)
        except (OSError, subprocess.SubprocessError):
            found[path] = None
    return found


def nvidia_toolkit_version() -> ToolkitVersion | None:
    """The oldest readable NVIDIA container toolkit version on PATH, or None if none is installed."""
    versions = [v for v in toolkit_versions().values() if v is not None]
    return min(versions, key=lambda v: ((v.major, v.minor, v.patch), 0 if v.pre else 1)) if versions else None


def check_gpu_support(min_version: tuple[int, ...] = MIN_TOOLKIT_VERSION, *,
                      probe: Callable[[], dict[str, ToolkitVersion | None]] = toolkit_versions) -> ToolkitVersion:
    """Return the toolkit version, or raise :class:`GpuUnsupported` (missing / too old)."""
    minimum = ".".join(map(str, min_version))
    found = probe()
    readable = {path: v for path, v in found.items() if v is not None}
    if not readable:
        where = (f"found {', '.join(found)} but could not read a version from it" if found
                 else f"none of {', '.join(TOOLKIT_PROBES)} is on PATH")
        raise GpuUnsupported("gpu_toolkit_missing", f"this miner cannot run GPU jobs: the NVIDIA container toolkit "
                             f"is not installed ({where}); install nvidia-container-toolkit >= {minimum} and "
                             "configure docker for it")
    old = {path: v for path, v in readable.items() if not v.at_least(min_version)}
    if old:
        listed = ", ".join(f"{path} {v}" for path, v in old.items())
        raise GpuUnsupported("gpu_toolkit_too_old", f"this miner refuses GPU jobs: NVIDIA container toolkit {listed} "
                             f"is older than {minimum}, below which containers can escape to the host "
                             f"(CVE-2025-23266 and earlier); upgrade nvidia-container-toolkit to >= {minimum}")
    return min(readable.values(), key=lambda v: ((v.major, v.minor, v.patch), 0 if v.pre else 1))
