"""validator-core's probe requests: it also asks verifiable streams itself, as an
ordinary client, so that a miner serving few users is still checked and cannot tell which
answers matter.

    key       every stream of a ``verifiable`` whitelisted app gets one extra client key, derived
              from a secret only validator-core holds (``HMAC(secret, job id)``), placed among the
              user's keys at a position derived the same way: the miner sees N keys and cannot
              tell which one is the validator's (a key shared by all jobs would give it away).
    send      every ``verify_probe_interval_s`` per ready stream (the first one at a random time
              in the first interval), one chat completion through the miner's proxy: a prompt
              drawn from templates, greedy or sampled, streamed or not, like any client; the
              answer's receipt is verified like any client's (``VerifyingTransport``).
    sample    a probe's answer is collected with all others; its request id is in ``probes``,
              so it is always verified (not drawn with ``verify_fraction``).

Probes cost the stream's user some capacity: one short answer per interval (a 64-token answer
per 10 minutes by default). A probe that gets no answer is logged and recorded, not an incident:
the stream's own liveness is judged by heartbeats and the proxy.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import secrets
import threading

import httpx
import sqlalchemy as sa

from cluster.errors import CertificateUntrusted, ReceiptInvalid
from cluster.protocol.canonical import NS
from cluster.protocol.client_envelope import REQUEST_HEADER, RequestSigner, sign_request
from cluster.protocol.envelope import SignedEnvelope
from cluster.protocol.http import tls_verify
from cluster.protocol.identity import Clock, read_or_create_secret
from cluster.protocol.jobs import JobStatus
from cluster.protocol.keys import PublicKey, SigningKey
from cluster.protocol.streams import StreamReady
from cluster.settings import ValidatorSettings
from cluster.validator import store as db
from cluster.validator.streams import client_keys, route_prefix
from serve_apps.api import VerifyingTransport

log = logging.getLogger("rayhorde.probes")

TOPICS = ("the moon", "rivers", "bread", "chess", "volcanoes", "bicycles", "honey bees", "glaciers", "libraries",
          "the ocean", "trains", "tea", "clocks", "deserts", "owls", "bridges", "music", "gardens", "comets", "salt")
TEMPLATES = ("Write two sentences about {topic}.", "Give three facts about {topic}.",
             "What is {a} plus {b}? Explain briefly.", "Describe {topic} to a child.",
             "List {n} words that rhyme with {word}.", "Write a short poem about {topic}.",
             "Why do people like {topic}?", "Count from {a} to {c}.")
WORDS = ("cat", "light", "tree", "stone", "rain", "sun", "fire", "door")
STYLES = ("", " Keep it short.", " Use simple words.", " Answer in one line.", " Be precise.", " Be friendly.")


def probe_prompt(rng: random.Random) -> dict:
    """A chat request body (without ``model``) like a client's: varied prompt, sampler, length."""
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    text = rng.choice(TEMPLATES).format(topic=rng.choice(TOPICS), a=a, b=b, c=a + rng.randint(3, 9),
                                        n=rng.randint(2, 5), word=rng.choice(WORDS)) + rng.choice(STYLES)
    messages = [{"role": "user", "content": text}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": "You are a concise assistant."})
    return {"messages": messages, "max_tokens": rng.choice((16, 32, 48, 64)),
            "temperature": rng.choice((0.0, 0.0, 0.7, 1.0)), "stream": rng.random() < 0.5}


class ProbeDesk:
    def __init__(self, settings: ValidatorSettings, *, engine: sa.Engine, clock: Clock) -> None:
        self.settings = settings
        self.engine = engine
        self.clock = clock
        self._secret = bytes.fromhex(read_or_create_secret(self.settings.home / "probe_secret"))
        self._rng = random.Random(secrets.randbits(64))  # prompts and timing: not predictable by a miner
        self._next_ns: dict[str, int] = {}  # job id -> when its next probe is due
        self._tls = tls_verify(settings.ca_bundle_path)  # miners' proxies; a bad bundle fails at start

    # ------------------------------------------------------------------ keys
    def _derive(self, job_id: str) -> bytes:
        return hmac.new(self._secret, b"rayhorde-probe:" + job_id.encode(), hashlib.sha256).digest()

    def key(self, job_id: str) -> SigningKey:
        return SigningKey(self._derive(job_id).hex())

    def client_keys(self, job_id: str, keys: list[PublicKey]) -> list[PublicKey]:
        """The stream's client keys with this validator's probe key among them (same order every call)."""
        pos = self._derive(job_id)[0] % (len(keys) + 1)
        return [*keys[:pos], self.key(job_id).public, *keys[pos:]]

    # ------------------------------------------------------------------ sending
    def _due(self) -> list[sa.Row]:
        now = self.clock()
        interval_ns = int(self.settings.verify_probe_interval_s * NS)
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(db.streams).where(
                db.streams.c.status == JobStatus.streaming_ready.value)).all()
        due = []
        for s in rows:
            if self.key(s.id).public not in client_keys(s):
                continue  # deployed without a probe key: not a verifiable app
            first = self._next_ns.setdefault(s.id, now + int(self._rng.random() * interval_ns))
            if now >= first:
                due.append(s)
        for gone in set(self._next_ns) - {s.id for s in rows}:
            del self._next_ns[gone]
        return due

    def tick(self) -> int:
        """Send the probes that are due; returns how many got a verified answer."""
        sent = 0
        for s in self._due():
            self._next_ns[s.id] = self.clock() + int(self.settings.verify_probe_interval_s * NS)
            sent += self.send(s)
        return sent

    def send(self, s: sa.Row) -> bool:
        ready = StreamReady.model_validate(SignedEnvelope.model_validate_json(s.ready_envelope).payload)
        transport = VerifyingTransport(ready, s.miner_hotkey, max_skew_s=self.settings.max_clock_skew_s,
                                       inner=httpx.HTTPTransport(verify=self._tls))
        key, route = self.key(s.id), route_prefix(s.id)
        body = probe_prompt(self._rng)
        error, probe_id = "", None
        try:
            with httpx.Client(base_url=ready.proxy_url.rstrip("/"), transport=transport,
                              timeout=self.settings.verify_probe_timeout_s) as client:
                models = client.get(f"{route}/v1/models", auth=RequestSigner(key, s.id))  # as the openai client does
                models.raise_for_status()
                body["model"] = models.json()["data"][0]["id"]
                raw = json.dumps(body).encode()
                path = f"{route}/v1/chat/completions"
                headers = sign_request(key, job_id=s.id, method="POST", path=path, body=raw)
                # recorded BEFORE it is sent: the collector may pull the answer before this thread
                # sees it, and must already know it is a probe (always verified)
                with self.engine.begin() as conn:
                    probe_id = conn.execute(db.probes.insert().values(
                        request_id=hashlib.sha256(base64.b64decode(headers[REQUEST_HEADER])).hexdigest(),
                        job_id=s.id, miner_hotkey=s.miner_hotkey, sent_ns=self.clock())).inserted_primary_key[0]
                with client.stream("POST", path, content=raw,
                                   headers={**headers, "content-type": "application/json"}) as resp:
                    resp.read()
                    if resp.status_code != 200:
                        error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                    elif resp.extensions.get("rayhorde_stream") is None and "rayhorde_receipt" not in resp.extensions:
                        error = "the answer carried no receipt"
        except CertificateUntrusted as exc:  # VerifyingTransport names it (the fix is our CA bundle)
            error = str(exc)
        except (httpx.HTTPError, ReceiptInvalid, ValueError, KeyError, IndexError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        if error:
            with self.engine.begin() as conn:
                if probe_id is None:
                    conn.execute(db.probes.insert().values(job_id=s.id, miner_hotkey=s.miner_hotkey,
                                                           sent_ns=self.clock(), error=error))
                else:
                    conn.execute(db.probes.update().where(db.probes.c.id == probe_id).values(error=error))
            log.warning("probe of %s on miner %s got no verified answer: %s", s.id, s.miner_hotkey, error)
        return not error

    def start(self, stop: threading.Event) -> threading.Thread | None:
        if self.settings.verify_probe_interval_s <= 0:
            return None

        def loop() -> None:
            while not stop.wait(self.settings.verify_interval_s):
                try:
                    self.tick()
                except Exception:  # keep probing; one bad stream must not stop the others
                    log.exception("probe tick failed")
        thread = threading.Thread(target=loop, name="probes", daemon=True)
        thread.start()
        return thread
