"""Pulling answers from a miner's proxy and checking everything that can be checked without the
model. Every streaming answer carries a receipt signed by the job key and counter-signed by the
miner, and receipts are chained per job so that a miner cannot hide an answer: a gap or a fork
in the chain counts as a failed verification.

For one streaming job, :func:`pull` asks the miner's proxy for a page of the receipts after the
last one collected (a ``receipts_pull`` envelope signed by the validator hotkey) and checks, in
``seq`` order, each item's

- receipt: job-key signature, miner counter-signature (the keys from the miner-signed
  readiness), both hashes against the bytes handed over, and the chain: ``seq`` must follow the
  previous one with ``prev_sha256`` = its digest. A missing seq is an answer the miner did not
  hand over: ``chain_gap``, a failed verification, never silently skipped;
- client envelope: canonical, signed by a key registered for the job, for this job, with the
  request body's hash, and ``sha256(envelope)`` = the receipt's request id (the sampling key):
  :func:`~cluster.verification.binding.bind_claim`.

Items that pass become :class:`Claim` s (the verifier scores the model's side); items that fail
become failed :class:`Verdict` s with the reason. Nothing here trusts the miner's JSON beyond
what the signatures bind.

Before any item is checked, the page itself is held to the protocol, and every pull to a
:class:`Budget`, whatever the proxy sends:

- the page: a JSON object of this job whose ``receipts`` is a list of at most ``limit`` typed
  records (:class:`~cluster.protocol.messages.ReceiptsPage`, strict types, request ids of 64 hex
  digits), ``seq`` strictly increasing and past the cursor, no request id twice;
- bytes: a pass over one stream (:func:`pull_pass`, page after page) reads at most ``max_bytes``
  of page bodies; a ``Content-Length`` over what is left is refused before the body is read;
- time: a pass ends ``seconds`` after it began. Each read is bounded by what is left, and a
  watchdog shuts the connection down at the deadline, so neither slow headers nor one byte
  every few seconds can stretch a pass (a read timeout bounds each read, not their sum).

A page that breaks the protocol, or that could not be finished with the whole budget (the
first of a pass), raises :class:`~cluster.errors.CollectionFailed`, naming the page and the
problem: validator-core charges the miner (``collection_failed``). A later page that what is
left of the budget could not hold ends the pass without blame: the next pass starts with it.
A proxy that does not answer (refused, unreachable, an HTTP error status) raises
``httpx.HTTPError``: nothing is charged, nothing is lost (the cursor did not move).
"""

from __future__ import annotations

import base64
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import httpx
from pydantic import ValidationError

from cluster.errors import ClaimRejected, CollectionFailed, ReceiptInvalid
from cluster.protocol.envelope import seal
from cluster.protocol.identity import Hotkey
from cluster.protocol.keys import PublicKey
from cluster.protocol.messages import ReceiptRecord, ReceiptsPage, ReceiptsPull
from cluster.protocol.receipts import ReceiptBody, verify_receipt
from cluster.verification.binding import RECEIPT, bind_claim
from cluster.verification.models import Claim, Verdict

_REQUEST_ID = re.compile(r"[0-9a-f]{64}")  # sha256 of the client's envelope, hex
_ERROR_BODY_MAX = 64 * 2**10  # of an HTTP error answer, kept for its message


@dataclass
class StreamSource:
    """One job's collection state: who serves it, its keys, and where collection stopped."""

    job_id: str
    miner_hotkey: str
    proxy_url: str
    job_key: PublicKey
    client_keys: list[PublicKey]
    route_prefix: str
    weights_sha256: str | None
    after_seq: int = -1
    prev: ReceiptBody | None = None  # the receipt body at ``after_seq`` (None before the first)


@dataclass(frozen=True)
class Budget:
    """What one pass over one stream may cost (validator settings ``collect_*``)."""

    seconds: float = 60
    max_bytes: int = 256 * 2**20
    limit: int = 50  # records asked per page


@dataclass
class Collected:
    claims: list[Claim] = field(default_factory=list)
    failures: list[Verdict] = field(default_factory=list)
    last_seq: int = -1
    last_body: ReceiptBody | None = None
    done: bool = True  # False: the proxy has more pages
    page: int = 1  # which page of the pass
    size: int = 0  # bytes of its body
    request_ids: list[str] = field(default_factory=list)  # every record's, in seq order


def pull_pass(source: StreamSource, validator: Hotkey, http: httpx.Client, budget: Budget,
              keep: Callable[[Collected], None], gaps: GapWatch | None = None) -> int:
    """One pass over ``source``: page after page from its cursor, each checked and handed to
    ``keep`` (which stores it, and may raise :class:`CollectionFailed` itself: a request id it
    holds already) before the next is asked, until a short page or the budget's end. Returns
    how many pages were kept; raises :class:`CollectionFailed` (charged) or ``httpx.HTTPError``
    (not), pages kept before it stay kept."""
    deadline = time.monotonic() + budget.seconds
    left = budget.max_bytes
    cursor, page = source, 0
    while True:
        page += 1
        try:
            got = pull(cursor, validator, http, limit=budget.limit, deadline=deadline, max_bytes=left, page=page,
                       gaps=gaps)
        except CollectionFailed as exc:
            if page > 1 and exc.reason in ("over_byte_budget", "over_time_budget"):
                return page - 1  # what was left could not hold this page: the next pass starts with it
            raise
        keep(got)
        left -= got.size
        cursor = replace(cursor, after_seq=got.last_seq, prev=got.last_body)
        if got.done or left <= 0 or time.monotonic() >= deadline:
            return page


def pull(source: StreamSource, validator: Hotkey, http: httpx.Client, *, limit: int = 100,
         deadline: float | None = None, max_bytes: int = Budget.max_bytes, page: int = 1,
         gaps: GapWatch | None = None) -> Collected:
    """One page of ``source``'s receipts after ``source.after_seq``, checked; read by the
    ``time.monotonic()`` ``deadline`` (default: a whole :class:`Budget` from now) in at most
    ``max_bytes``. Raises :class:`CollectionFailed` if the page breaks the protocol or the
    budget, ``httpx.HTTPError`` if the proxy does not answer (the caller retries later: nothing
    is lost, the cursor did not move). A hole in the seqs is a ``chain_gap`` once ``gaps`` has
    seen it for its grace (none given: at once); until then the page ends before it."""
    env = seal(validator, "receipts_pull", ReceiptsPull(job_id=source.job_id, after_seq=source.after_seq, limit=limit))
    raw = _fetch(http, f"{source.proxy_url.rstrip('/')}/jobs/{source.job_id}/receipts",
                 params={"after_seq": source.after_seq, "limit": limit},
                 headers={"Authorization": f"Rayhorde {env.to_token()}"},
                 deadline=time.monotonic() + Budget.seconds if deadline is None else deadline,
                 max_bytes=max_bytes, page=page)
    records = _page(source, raw, limit=limit, page=page)
    out = Collected(last_seq=source.after_seq, last_body=source.prev, done=len(records) < limit, page=page,
                    size=len(raw))
    for record in records:
        body_ = record.receipt.body
        if body_.seq != out.last_seq + 1 and gaps is not None and gaps.waiting(source.job_id, out.last_seq + 1):
            out.done = True  # the answers after the hole wait for the next pass: it may yet be filled
            break
        out.request_ids.append(body_.request_id)
        if body_.seq != out.last_seq + 1:
            missing = list(range(out.last_seq + 1, body_.seq))
            out.failures.append(_failed(source, body_.request_id, "chain_gap",
                                        f"receipts {missing} of job {source.job_id} were not handed over "
                                        f"(got seq {body_.seq} after {out.last_seq})"))
            out.last_body = None  # the chain restarts here: nothing to link this receipt to
        try:
            claim = _check(source, record, prev=out.last_body)
        except ReceiptInvalid as exc:
            out.failures.append(_failed(source, body_.request_id, "chain_gap" if exc.check == "chain" else
                                        f"receipt_{exc.check}", exc.message))
        except ClaimRejected as exc:
            out.failures.append(_failed(source, body_.request_id, exc.reason, exc.message))
        else:
            out.claims.append(claim)
        out.last_seq, out.last_body = body_.seq, body_
    return out


class GapWatch:
    """When each hole in a job's receipt seqs was first seen. A proxy keeps answers in the order
    they finish, and a job numbers them in the order it signs them, so under load seq ``n + 1``
    can be kept a moment before ``n``: a hole is a ``chain_gap`` only once it has stayed open
    ``grace_s`` (the validator's own clock, not a time the miner signed). In memory: after a
    validator-core restart a hole gets its grace again (the miner is favoured, never wrongly
    charged)."""

    def __init__(self, grace_s: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.grace_s = grace_s
        self.monotonic = monotonic
        self._first: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()

    def waiting(self, job_id: str, seq: int) -> bool:
        """Whether the hole at ``seq`` of ``job_id`` is still within its grace (first seen now if new)."""
        now = self.monotonic()
        with self._lock:
            first = self._first.setdefault((job_id, seq), now)
            if now - first < self.grace_s:
                return True
            del self._first[(job_id, seq)]
            return False


# ---------------------------------------------------------------------------- the page, bounded
class _Watchdog:
    """Shuts a pull's connection down at its deadline: a socket shut down under a blocked read
    ends the read at once (closing it from another thread would not). It holds its own
    duplicate of the socket httpcore reports opening (its ``trace`` extension), so the cut
    reaches the TLS handshake too, and never another connection that reused a closed one's
    descriptor. A pull asks for ``Connection: close``: it never rides a pooled connection."""

    def __init__(self, seconds: float) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None  # our duplicate of the connection's socket
        self.connected = False  # the proxy accepted the connection: what follows is its doing
        self.fired = False
        self._timer = threading.Timer(max(0.0, seconds), self._cut)
        self._timer.daemon = True
        self._timer.start()

    def trace(self, event: str, info: dict) -> None:
        if event == "connection.connect_tcp.complete":
            raw = info["return_value"].get_extra_info("socket")
            with self._lock:
                self.connected = True
                if raw is not None and self._sock is None and not self.fired:
                    self._sock = socket.socket(fileno=os.dup(raw.fileno()))

    def _cut(self) -> None:
        with self._lock:
            self.fired = True
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # the peer is gone already
                    pass

    def stop(self) -> None:
        self._timer.cancel()
        with self._lock:
            if self._sock is not None:
                self._sock.close()  # our descriptor only: the connection is httpx's to close
                self._sock = None


def _fetch(http: httpx.Client, url: str, *, params: dict, headers: dict, deadline: float, max_bytes: int,
           page: int) -> bytes:
    """The body of one page, read by ``deadline`` in at most ``max_bytes``."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise CollectionFailed("over_time_budget", f"no time was left for page {page}", page=page)
    dog = _Watchdog(left)
    try:
        with http.stream("GET", url, params=params, timeout=left, extensions={"trace": dog.trace},
                         headers={**headers, "Connection": "close", "Accept-Encoding": "identity"}) as resp:
            return _body(resp, deadline=deadline, max_bytes=max_bytes, page=page)
    except httpx.HTTPStatusError:
        raise
    except httpx.HTTPError as exc:
        if dog.connected and (dog.fired or time.monotonic() >= deadline):
            raise _over_time(page, None) from exc
        raise
    finally:
        dog.stop()


def _body(resp: httpx.Response, *, deadline: float, max_bytes: int, page: int) -> bytes:
    ok = resp.is_success
    declared = resp.headers.get("content-length", "")
    if ok and declared.isdigit() and int(declared) > max_bytes:
        raise CollectionFailed("over_byte_budget", f"page {page} announces {declared} bytes; the byte budget "
                               f"left is {max_bytes}", page=page)
    cap = max_bytes if ok else min(max_bytes, _ERROR_BODY_MAX)
    chunks, size = [], 0
    for chunk in resp.iter_bytes():
        size += len(chunk)
        if size > cap:
            if not ok:
                break  # an error's text is kept for its message only
            raise CollectionFailed("over_byte_budget", f"page {page} went past the byte budget of {max_bytes} "
                                   "bytes", page=page)
        if time.monotonic() > deadline:
            raise _over_time(page, size)
        chunks.append(chunk)
    content = b"".join(chunks)
    if not ok:  # raises httpx.HTTPStatusError, the answer's text readable
        httpx.Response(resp.status_code, content=content, request=resp.request,
                       headers={"content-type": resp.headers.get("content-type", "")}).raise_for_status()
    return content


def _over_time(page: int, size: int | None) -> CollectionFailed:
    got = "" if size is None else f" ({size} bytes had come)"
    return CollectionFailed("over_time_budget", f"page {page} was not over when the time budget ran out{got}",
                            page=page)


def _page(source: StreamSource, body: bytes, *, limit: int, page: int) -> list[ReceiptRecord]:
    """The page's records, if it keeps the protocol; else :class:`CollectionFailed` naming why."""
    try:
        parsed = ReceiptsPage.model_validate_json(body, strict=True)
    except ValidationError as exc:
        raise CollectionFailed("malformed_page", f"page {page} is not a receipts page: {_why(exc)}",
                               page=page) from None
    if parsed.job_id != source.job_id:
        raise CollectionFailed("malformed_page", f"page {page} is of job {parsed.job_id[:80]!r}, not "
                               f"{source.job_id}", page=page)
    records = parsed.receipts
    if len(records) > limit:
        raise CollectionFailed("page_too_long", f"page {page} holds {len(records)} records; {limit} were asked",
                               page=page)
    after, seen = source.after_seq, {}
    for record in records:
        b = record.receipt.body
        if b.seq <= after:
            first = after == source.after_seq
            raise CollectionFailed("seq_not_advancing", f"page {page} did not advance past seq {after} ("
                                   f"{'its first record is' if first else 'the next is'} seq {b.seq})", page=page)
        if not _REQUEST_ID.fullmatch(b.request_id):
            raise CollectionFailed("malformed_page", f"page {page}: seq {b.seq}'s request id is not 64 hex "
                                   "digits", page=page)
        if b.request_id in seen:
            raise CollectionFailed("duplicate_request_id", f"page {page} repeats request id {b.request_id} "
                                   f"(seq {seen[b.request_id]} and {b.seq})", page=page)
        after, seen[b.request_id] = b.seq, b.seq
    return records


_JSON_TYPES = {list: "an array", dict: "an object", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def _why(exc: ValidationError) -> str:
    """The first problem of a page that failed validation (never the miner's bytes themselves)."""
    first = exc.errors(include_url=False, include_input=True)[0]
    where = ".".join(str(part) for part in first["loc"]) or "the top"
    got = f", got {_JSON_TYPES.get(type(first.get('input')), 'a value')}" if first["type"].endswith("_type") else ""
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"at {where}: {first['msg']}{got}{more}"


# ---------------------------------------------------------------------------- one record
def _check(source: StreamSource, record: ReceiptRecord, *, prev: ReceiptBody | None) -> Claim:
    try:
        request = base64.b64decode(record.request_b64, validate=True)
        response = base64.b64decode(record.response_b64, validate=True)
        envelope = base64.b64decode(record.envelope_b64, validate=True)
    except ValueError as exc:
        raise ClaimRejected("malformed_record", f"the proxy's record holds bodies or an envelope that are not "
                            f"base64: {exc!r}") from exc
    receipt, client_sig = record.receipt, record.client_sig
    verify_receipt(receipt, job_id=source.job_id, job_key=source.job_key, miner_hotkey=source.miner_hotkey,
                   sent_body=request, received_body=response, prev=prev)
    try:
        bind_claim(envelope, receipt.body, request_body=request, response_body=response, job_id=source.job_id,
                   miner_hotkey=source.miner_hotkey, client_sig=client_sig, client_keys=source.client_keys)
    except ReceiptInvalid as exc:  # the envelope's checks keep their own reasons
        raise ClaimRejected(f"receipt_{exc.check}" if exc.check == RECEIPT else exc.check, exc.message) from exc
    return Claim(job_id=source.job_id, miner_hotkey=source.miner_hotkey,
                 weights_sha256=source.weights_sha256 or "0" * 64, route_prefix=source.route_prefix,
                 envelope=envelope, client_sig=client_sig, request_body=request, response_body=response,
                 receipt=receipt)


def _failed(source: StreamSource, request_id: str, reason: str, message: str) -> Verdict:
    return Verdict(request_id=request_id or f"{source.job_id}:unknown", job_id=source.job_id,
                   miner_hotkey=source.miner_hotkey, ok=False, reason=reason, message=message, margin=0.0,
                   verifier="validator-core", weights_sha256=source.weights_sha256 or "0" * 64)
