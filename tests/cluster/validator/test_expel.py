"""A ban or a deregistration acts at once, not at the miner's next join: the sweeper expels it
within a sweep (attempts retired, streams ended, admission forgotten, its Ray node ended); its
heartbeats, reports and joins are refused with the reason; the other miners keep working."""

from __future__ import annotations

import json

import pytest

from cluster.errors import AdmissionRefused, TicketRefused
from cluster.protocol.messages import Heartbeat
from cluster.validator.ledger import IMPOSTOR
from tests.cluster.validator.test_validator_service import BOB, CHARLIE, Harness, by_hotkey, h, node_of, refused  # noqa: F401


def running(h: Harness):
    """Bob and Charlie admitted with nodes, one job running on one of them: (cap, sub, its miner, the other)."""
    ended: list[str] = []
    h.core.admission.end_node = ended.append
    h.admit(BOB), h.admit(CHARLIE)
    cap = h.capability()
    sub = h.submit(cap)
    h.fetch(by_hotkey(sub.ticket.miner_hotkey), sub.ticket.ticket_id)
    victim = by_hotkey(sub.ticket.miner_hotkey)
    return cap, sub, victim, CHARLIE if victim is BOB else BOB, ended


def admitted(h: Harness) -> set[str]:
    return {m["hotkey"] for m in h.core.cluster_status()["miners"]}


def test_a_miner_removed_from_the_metagraph_is_out_within_a_sweep(h):
    cap, sub, gone, other, ended = running(h)
    path = h.settings.metagraph_path
    mg = json.loads(path.read_text())
    mg["neurons"] = [n for n in mg["neurons"] if n["hotkey"] != gone.ss58]
    path.write_text(json.dumps(mg))
    assert h.core.admission.heartbeat(h.seal(gone, "heartbeat", Heartbeat())) == []  # until the sweeper looks
    h.core.sweep()
    err = refused(AdmissionRefused, "not_registered", h.core.admission.heartbeat,
                  h.seal(gone, "heartbeat", Heartbeat(running_tickets=[sub.ticket.ticket_id])))
    assert f"hotkey {gone.ss58} is not registered on subnet 12" in err.message
    assert admitted(h) == {other.ss58} and ended == [node_of(gone)]
    view = h.core.organic.get(cap, sub.job_id)  # its job moved on to the other miner
    assert (view.ticket.miner_hotkey, view.ticket.attempt) == (other.ss58, 2)
    assert (gone.ss58, "fabric", "miner_not_registered", 1) in h.incidents()  # leaving is no offence
    refused(TicketRefused, "ticket_closed", h.result, gone, sub.job_id, sub.ticket)  # its late result is refused
    refused(AdmissionRefused, "not_registered", h.admit, gone)
    assert h.core.admission.heartbeat(h.seal(other, "heartbeat", Heartbeat())) == []
    h.fetch(other, view.ticket.ticket_id)
    h.result(other, sub.job_id, view.ticket)
    assert h.core.organic.get(cap, sub.job_id).status.value == "completed"


def test_a_banning_incident_expels_the_miner_within_a_sweep(h):
    cap, sub, cheat, other, ended = running(h)
    with h.core.engine.begin() as conn:
        h.core.ledger.incident(conn, cheat.ss58, IMPOSTOR, charged=True, job_id=None, attempt=None, evidence="{}")
    h.core.sweep()  # no heartbeat needed
    assert admitted(h) == {other.ss58} and ended == [node_of(cheat)]
    assert (cheat.ss58, "miner", "miner_banned", 1) in h.incidents()
    view = h.core.organic.get(cap, sub.job_id)
    assert (view.ticket.miner_hotkey, view.ticket.attempt) == (other.ss58, 2)
    err = refused(AdmissionRefused, "banned", h.core.admission.heartbeat, h.seal(cheat, "heartbeat", Heartbeat()))
    assert f"banned by this validator for {IMPOSTOR}" in err.message
    refused(AdmissionRefused, "banned", h.admit, cheat)  # it cannot come back by joining again
    assert h.core.admission.heartbeat(h.seal(other, "heartbeat", Heartbeat())) == []


def test_an_operator_ban_in_the_config_expels_at_the_next_sweep(h):
    cap, sub, banned, other, ended = running(h)
    h.settings.banned_hotkeys = [banned.ss58]
    h.core.sweep()
    assert admitted(h) == {other.ss58} and ended == [node_of(banned)]
    refused(AdmissionRefused, "banned", h.core.admission.heartbeat, h.seal(banned, "heartbeat", Heartbeat()))


@pytest.mark.parametrize("garbage", ["", "{not json", json.dumps({"netuid": 99, "block": 1, "neurons": []})])
def test_a_metagraph_that_cannot_be_read_expels_nobody(h, garbage):
    cap, sub, miner, other, ended = running(h)
    h.settings.metagraph_path.write_text(garbage)
    h.core.sweep()
    assert admitted(h) == {miner.ss58, other.ss58} and ended == []
    assert h.core.admission.heartbeat(h.seal(miner, "heartbeat", Heartbeat(running_tickets=[sub.ticket.ticket_id]))) == []
