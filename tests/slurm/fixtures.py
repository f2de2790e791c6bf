"""A real Slurm cluster for the test session (Debian's slurm-wlm + munge, on loopback): one slurmctld and two
slurmd node agents on this host, so multi-node jobs run for real.

`slurm_cluster` installs Slurm if missing (tests/slurm/cluster.sh install), starts slurmctld, the slurmds and a
private munged in a temp dir on free ports (so a second test session on the same machine gets its own
cluster), points SLURM_CONF at it, and stops every daemon by its pid file afterwards.
It skips only where a cluster cannot be had at all: not root, or no apt-get to install Slurm with.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

CLUSTER_SH = Path(__file__).resolve().parent / "cluster.sh"
NODES = 2  # slurmd node agents on this host (tests/slurm/cluster.sh)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ensure_installed() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and cannot be: the tests need root and apt-get "
                    "(or install slurm-wlm and munge yourself)")
    result = subprocess.run(["bash", str(CLUSTER_SH), "install"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"installing Slurm failed:\n{result.stderr[-3000:]}"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs its daemons as root; run the suite as root")
    _ensure_installed()
    root = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "QFORGE_SLURMCTLD_PORT": str(_free_port()), "QFORGE_SLURM_NODES": str(NODES),
           "QFORGE_SLURMD_PORTS": ",".join(str(_free_port()) for _ in range(NODES))}
    started = subprocess.run(["bash", str(CLUSTER_SH), "start", str(root)], capture_output=True, text=True,
                             env=env, timeout=180)
    previous = os.environ.get("SLURM_CONF")
    try:
        assert started.returncode == 0, f"the Slurm cluster did not start:\n{started.stderr[-4000:]}"
        os.environ["SLURM_CONF"] = str(root / "slurm.conf")  # inherited by train.py, sbatch and the jobs
        yield root
    finally:
        subprocess.run(["bash", str(CLUSTER_SH), "stop", str(root)], capture_output=True, text=True, timeout=180)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
