"""Image references and the validator's image allow/deny policy (both validator-core and miners use them).

- :func:`parse_reference` splits ``[domain/]path[:tag][@sha256:<64 hex>]`` by Docker's reference
  grammar (distribution/reference) and refuses anything else with :class:`InvalidImageReference`.
- :class:`ImagePolicy` is validator-side: glob patterns (``fnmatch``, case-sensitive; ``*`` also
  matches ``/``, ``:`` and ``@``) over the reference as written, its familiar form and its fully
  qualified form (``docker.io/library/busybox:latest``). A deny rule wins over an allow rule; an
  empty allow list allows every image that no deny rule names.

The pull itself (digest check, limit, registry credentials) is ``DockerRuntime.pull`` on the miner;
whether a miner may run GPU jobs at all is ``cluster.miner.gpu``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import NamedTuple

from cluster.errors import ImageDenied, InvalidImageReference

DEFAULT_DOMAIN = "docker.io"


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
