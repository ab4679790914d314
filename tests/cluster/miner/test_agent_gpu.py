"""A miner without the NVIDIA container toolkit (>= 1.17.8) cannot offer a GPU executor class:
its agent refuses to start and says why (this machine has no GPU)."""

import os
import subprocess
import sys

import pytest

from cluster.protocol.identity import create_dev_wallet
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def test_agent_refuses_to_offer_a_gpu_class_without_the_toolkit(engine, tmp_path):
    create_dev_wallet(tmp_path / "w", "miner", "//Bob")
    env = {**os.environ, "RAYHORDE_MINER_HOME": str(tmp_path / "m"), "RAYHORDE_MINER_WALLET_PATH": str(tmp_path / "w"),
           "RAYHORDE_MINER_VALIDATOR_URL": "http://127.0.0.1:9",  # never reached: refused before admission
           "RAYHORDE_MINER_EXECUTOR_CLASSES": '{"always_on.gpu-24gb": 1}'}
    done = subprocess.run([sys.executable, "-m", "cluster.miner.main", "--config",
                           str(REPO / "configs/miner.local.toml")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "refusing to offer ['always_on.gpu-24gb']" in done.stderr
    assert "1.17.8" in done.stderr
