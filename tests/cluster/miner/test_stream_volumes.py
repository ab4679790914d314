"""A streaming job's volume, read by its app through the agent's executor socket: every Ray process
of a miner's node runs as one user, so the files are kept where none can read them, and the agent
hands a file only to a request signed by that job's key (the key readiness bound to the job).
The agent's side is the real StreamKeeper behind the real executor API on a unix socket; the
app's side is the real JobSide every whitelisted app holds."""

from __future__ import annotations

import ctypes
import time
from types import SimpleNamespace

import httpx
import pytest

from cluster.miner.executor_api import build_executor_app
from cluster.miner.proxy import JobRoute
from cluster.miner.serving import BackgroundServer
from cluster.miner.streams import StreamKeeper
from cluster.protocol.http import ServiceClient
from cluster.protocol.identity import Hotkey
from cluster.protocol.job_side import JobSide
from cluster.protocol.jobs import AGENT_SOCKET_ENV
from cluster.protocol.keys import SigningKey
from cluster.protocol.streams import VOLUME_READ_PATH, VolumeRead

MINER = Hotkey.from_uri("//Bob")
JOB, OTHER_JOB = "s" + "a" * 32, "s" + "b" * 32


@pytest.fixture
def agent(tmp_path, monkeypatch):
    keeper = StreamKeeper(MINER, ServiceClient("http://validator.invalid"), validator_hotkey=MINER.ss58, proxy_port=1,
                          proxy_url="http://127.0.0.1:1", serve_url="http://127.0.0.1:1",
                          volumes_dir=tmp_path / "volumes", idle_timeout_s=5, max_skew_s=5, volume_max_bytes=2**20)
    for job in (JOB, OTHER_JOB):
        (tmp_path / "volumes" / job).mkdir(parents=True)
        (tmp_path / "volumes" / job / "notes.txt").write_text(f"notes of {job[:3]}")
    sock = str(tmp_path / "agent.sock")
    server = BackgroundServer(build_executor_app(SimpleNamespace(), keeper.read_volume), name="executor API", uds=sock)
    server.start()
    monkeypatch.setenv(AGENT_SOCKET_ENV, sock)
    yield SimpleNamespace(keeper=keeper, sock=sock)
    server.stop()


def _side(agent, job_id: str, *, ready: bool = True, clock=time.time_ns) -> JobSide:
    side = JobSide(job_id, MINER.ss58, [SigningKey().public], clock=clock)
    if ready:  # what readiness does: the proxy (and so the agent) learns the job key
        agent.keeper.proxy.add_job(JobRoute(job_id=job_id, upstream="http://127.0.0.1:1", client_keys=side.client_keys,
                                            job_key=side.key.public))
    return side


def test_only_a_request_signed_by_the_jobs_key_reads_its_volume(agent):
    side = _side(agent, JOB)
    assert side.read_volume("notes.txt") == b"notes of saa"
    other = _side(agent, OTHER_JOB)
    assert other.read_volume("notes.txt") == b"notes of sbb"

    impostor = JobSide(JOB, MINER.ss58, side.client_keys)  # the right job id, a key of its own
    with pytest.raises(OSError, match="not signed by job"):
        impostor.read_volume("notes.txt")
    raw = VolumeRead(job_id=JOB, name="notes.txt", t_ns=time.time_ns())  # unsigned
    with httpx.Client(transport=httpx.HTTPTransport(uds=agent.sock)) as c:
        resp = c.post(f"http://agent{VOLUME_READ_PATH}", json=raw.model_dump())
        assert resp.status_code == 403 and resp.json()["error"]["reason"] == "bad_signature"
        traversal = {**raw.model_dump(), "name": "../" + OTHER_JOB + "/notes.txt"}
        assert c.post(f"http://agent{VOLUME_READ_PATH}", json=traversal).status_code == 422  # before any file


def test_a_read_is_refused_with_the_reason_named(agent):
    with pytest.raises(OSError, match="no open streaming job"):
        _side(agent, "s" + "c" * 32, ready=False).read_volume("notes.txt")
    with pytest.raises(OSError, match="no file 'absent.txt'"):
        _side(agent, JOB).read_volume("absent.txt")
    with pytest.raises(OSError, match="max skew 5 s"):
        _side(agent, OTHER_JOB, clock=lambda: time.time_ns() - 30 * 10**9).read_volume("notes.txt")
    with pytest.raises(OSError, match="not a file name"):
        _side(agent, JOB).read_volume("../etc/passwd")
    ended = _side(agent, JOB)
    agent.keeper.proxy.end_job(JOB, "terminated")
    with pytest.raises(OSError, match="no open streaming job"):
        ended.read_volume("notes.txt")


def test_the_job_key_cannot_be_read_out_of_the_apps_process():
    JobSide(JOB, MINER.ss58, [SigningKey().public])
    assert ctypes.CDLL(None).prctl(3, 0, 0, 0, 0) == 0  # PR_GET_DUMPABLE: no ptrace, no /proc/<pid>/mem
