"""Images through whole jobs: a job pulls its image by digest from the
local registry and runs; a wrong digest, a denied image and a pull past its limit each fail with
the stage and reason."""

from __future__ import annotations

import time

import pytest

from cluster.errors import ImageDenied
from tests.cluster.miner.test_images import RegistryProxy, forget, pushed, registries  # noqa: F401 (fixtures)
from tests.conftest import container_events

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_job_runs_an_image_pulled_by_digest(stack, engine, pushed):  # noqa: F811
    forget(engine, pushed)
    view = stack.run({"image": pushed.ref("plain"), "command": ["cat", "/marker"]})
    assert view.status.value == "completed", view.failure
    assert view.result.stdout.strip() == pushed.token


def test_a_wrong_digest_fails_at_the_pull_stage(stack, engine, pushed):  # noqa: F811
    wrong = "sha256:" + ("0" if pushed.digest["plain"][7] != "0" else "1") * 64
    view = stack.run({"image": f"{pushed.repo['plain']}@{wrong}", "command": ["true"]})
    assert view.status.value == "failed"
    assert (view.failure.reason, view.failure.stage) == ("image_pull_failed", "image_pull")
    assert wrong in view.failure.message


def test_a_denied_image_is_refused_at_submission(stack, engine):
    since = time.time()
    with pytest.raises(ImageDenied) as err:
        stack.submit({"image": "127.0.0.1:55000/denied/miner-tool:1", "command": ["true"]})
    assert err.value.reason == "image_denied" and "*/denied/*" in err.value.message
    assert container_events(engine, since) == []


def test_a_pull_past_its_limit_fails_with_the_stage(stack, engine, pushed, registries):  # noqa: F811
    forget(engine, pushed)
    with RegistryProxy(registries["plain"], delay_s=1.5) as slow:
        view = stack.run({"image": f"{slow.url}/rayhorde-test/img-{pushed.token}@{pushed.digest['plain']}",
                          "command": ["true"], "image_pull_timeout_s": 1})
    assert view.status.value == "failed"
    assert (view.failure.reason, view.failure.stage) == ("image_pull_timed_out", "image_pull")
