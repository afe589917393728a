"""Two "nodes" on this machine: two torchrun launches with ``--nnodes 2`` meeting at 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import read_log  # noqa: E402

HELPER = Path(__file__).parent / "train_helpers.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_node_launch_trains_to_identical_weights(tmp_path):
    """Node 0 and node 1 (one process each, static rendezvous) = one 2-process standalone run."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HELPER.parent), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    train = [str(HELPER), "--max_train_steps", "4", "--gradient_accumulation_steps", "2", "--use_ema"]
    port = _free_port()
    nodes = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                          "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                          *train, "--output_dir", str(tmp_path / "nodes")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-4000:]
    single = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *train, "--output_dir", str(tmp_path / "standalone")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-4000:]

    hashes = [(tmp_path / "nodes" / f"weights_rank{r}.sha256").read_text() for r in range(2)]
    assert hashes[0] == hashes[1]  # both nodes hold the same weights
    assert hashes[0] == (tmp_path / "standalone" / "weights_rank0.sha256").read_text()  # as one 2-process node
    assert [r["loss"] for r in read_log(tmp_path / "nodes")] == [r["loss"] for r in read_log(tmp_path / "standalone")]
    assert (tmp_path / "nodes" / "checkpoint-4" / "ema").is_dir()
