"""validator-core's probe key on verifiable streams (validator/probes.py); the probes themselves
go through a real proxy in tests/cluster/verification/test_verification_e2e.py."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import sqlalchemy as sa

from cluster.settings import ValidatorSettings
from cluster.validator import store as db
from cluster.validator.probes import probe_prompt
from cluster.validator.core import ValidatorCore
from cluster.protocol.keys import SigningKey
from cluster.protocol.streams import StreamSpec
from tests.cluster.validator.test_scoring import ScoringHarness
from tests.cluster.validator.test_validator_service import ALICE, BOB, CHARLIE


@pytest.fixture
def h(tmp_path: Path):
    harness = ScoringHarness(tmp_path, f"sqlite:///{tmp_path / 'v.db'}")
    yield harness
    for core in harness.cores:
        core.engine.dispose()


def _deploy(h, app: str, users: list[SigningKey]):
    cap = h.capability()
    view = h.core.streams.deploy(cap, StreamSpec(app=app, version="1", client_keys=[k.public for k in users]))
    with h.core.engine.connect() as conn:
        app_entry = conn.execute(sa.select(db.streams.c.serve_app).where(db.streams.c.id == view.job_id)).scalar_one()
    [assigned] = [a for a in h.core.streams.assigned(view.miner_hotkey) if a.job_id == view.job_id]
    return view, app_entry["args"]["init"]["client_keys"], assigned.client_keys


def test_a_verifiable_stream_admits_one_extra_key_only_validator_core_can_sign_with(h):
    h.admit(BOB, executors=4), h.admit(CHARLIE, executors=4)
    users = [SigningKey(), SigningKey()]
    view, app_keys, proxy_keys = _deploy(h, "llm", users)
    probe = h.core.probes.key(view.job_id).public
    assert [k["public"] for k in app_keys] == [k.public for k in proxy_keys]  # the app and the proxy agree
    assert len(proxy_keys) == 3 and probe in proxy_keys and all(u.public in proxy_keys for u in users)
    # the same key and place after a restart (the secret is on disk, 0600), another key per job
    secret = h.settings.home / "probe_secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    again = ValidatorCore(h.settings, hotkey=ALICE, chain=h.chain, ray_token="token", clock=h.clock)
    h.cores.append(again)
    assert again.probes.client_keys(view.job_id, [u.public for u in users]) == proxy_keys
    [after] = [a for a in again.streams.assigned(view.miner_hotkey) if a.job_id == view.job_id]
    assert after.client_keys == proxy_keys
    others = {h.core.probes.key(f"s{i}").public.public for i in range(20)}
    assert len(others) == 20 and probe.public not in others
    # its place among the user's keys varies between jobs (a fixed place would give it away)
    places = {h.core.probes.client_keys(f"s{i}", [u.public for u in users]).index(h.core.probes.key(f"s{i}").public)
              for i in range(40)}
    assert places == {0, 1, 2}
    # another validator (another secret) derives other keys
    other = ValidatorSettings(**{**h.settings.model_dump(), "home": h.settings.home / "other"})
    other_core = ValidatorCore(other, hotkey=ALICE, chain=h.chain, ray_token="token", clock=h.clock)
    h.cores.append(other_core)
    assert other_core.probes.key(view.job_id).public != probe


def test_a_stream_that_is_not_verifiable_gets_no_probe_key(h):
    h.admit(BOB, executors=4)
    users = [SigningKey()]
    view, app_keys, proxy_keys = _deploy(h, "echo", users)
    assert proxy_keys == [users[0].public] and [k["public"] for k in app_keys] == [users[0].public.public]


def test_probe_prompts_vary_like_a_clients():
    rng = random.Random(7)
    bodies = [probe_prompt(rng) for _ in range(200)]
    assert len({b["messages"][-1]["content"] for b in bodies}) > 150
    assert {b["temperature"] for b in bodies} == {0.0, 0.7, 1.0} and {b["stream"] for b in bodies} == {True, False}
    assert any(b["messages"][0]["role"] == "system" for b in bodies)
    assert {b["max_tokens"] for b in bodies} <= {16, 32, 48, 64}
