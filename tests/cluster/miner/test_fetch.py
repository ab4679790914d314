"""The retry policy and the private-address refusal that the volumes and upload stages share
(their end-to-end behaviour is in test_volumes.py and test_uploads.py)."""

from __future__ import annotations

import threading

import httpx
import pytest

from cluster.errors import PrivateAddress, TransferStopped, UsageError
from cluster.miner.fetch import Retry, Stage, http_client


class Boom(Exception):
    pass


def stage(**kw) -> Stage:
    return Stage(**{"retries": 2, "backoff_s": 0, "timeout_s": 5, "deadline_s": None, "cancel": None, **kw})


def run(st: Stage, outcomes: list):
    """Retry over ``outcomes`` (a value, a Retry, or an exception to raise); return (result, tries)."""
    tries = []

    def attempt():
        out = outcomes[len(tries)]
        tries.append(out)
        if isinstance(out, BaseException):
            raise out
        return out

    result = st.retry(attempt, before=lambda: None, refused=lambda exc: Boom(f"refused: {exc}"),
                      exhausted=lambda n, last: Boom(f"{n} tries ({last})"))
    return result, len(tries)


def test_retries_until_a_result():
    assert run(stage(), [Retry("HTTP 503"), httpx.ConnectError("refused"), 7]) == (7, 3)


def test_gives_up_after_the_retries_naming_the_last_cause():
    with pytest.raises(Boom, match=r"^3 tries \(HTTP 502\)$"):
        run(stage(), [Retry("HTTP 503"), httpx.ReadTimeout("slow"), Retry("HTTP 502"), 7])
    with pytest.raises(Boom, match=r"^1 tries \(ConnectError\)$"):  # an exception without text: its type
        run(stage(retries=0), [httpx.ConnectError(""), 7])


def test_a_private_address_is_not_retried():
    with pytest.raises(Boom, match="^refused: nope$") as info:
        run(stage(), [PrivateAddress("nope"), 7])
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_other_errors_pass_through_at_once():
    with pytest.raises(ValueError):
        run(stage(), [ValueError("bad"), 7])


def test_a_failure_elsewhere_stops_a_waiting_retry_and_the_next_step():
    st = stage(backoff_s=30)
    threading.Timer(0.2, st.stop.set).start()
    with pytest.raises(TransferStopped):
        run(st, [Retry("HTTP 503"), 7])
    with pytest.raises(TransferStopped):
        st.halted()


def test_cancel_and_deadline_halt_the_stage():
    now = [100.0]
    cancel = threading.Event()
    st = stage(deadline_s=10, cancel=cancel, clock=lambda: now[0])
    assert st.halted() is None and st.timeout() == 5
    now[0] = 107.5
    assert st.timeout() == 2.5  # the per-operation timeout shrinks as the deadline nears
    now[0] = 111
    assert st.halted() == "timeout" and st.timeout() == 0.001
    cancel.set()
    assert st.halted() == "cancelled"


def test_private_addresses_refused_unless_allowed():
    assert issubclass(PrivateAddress, UsageError)
    with http_client(allow_private_networks=False, timeout_s=2, follow_redirects=True) as client:
        with pytest.raises(PrivateAddress) as info:  # the query (a presigned URL's signature) is not shown
            client.get("http://127.0.0.1:9/x?X-Amz-Signature=secret")
    assert str(info.value) == ("http://127.0.0.1:9/x?... resolves to 127.0.0.1, which is not a public address; "
                               "miners fetch and send only to public hosts")
    with http_client(allow_private_networks=True, timeout_s=2, follow_redirects=True) as client:
        assert client.event_hooks["request"] == [] and client.headers["User-Agent"] == "rayhorde-miner"
