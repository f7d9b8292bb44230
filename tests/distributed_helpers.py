"""Launch ``simplebits`` commands as one process, under ``torchrun --standalone``, or as N "nodes".

The multi-node launcher simulates N machines on loopback: N torchrun agents (``--nnodes=N``), each
with its own ``--node-rank``, meeting through a c10d rendezvous on 127.0.0.1 exactly as separate
machines meet on node 0's address. Only node 0 hosts the rendezvous store (``is_host``), as on real
machines where only node 0 owns the endpoint address.

Every launcher runs ``python -m pipeline.cli *cli_args`` with ``OMP_NUM_THREADS=1`` (two cores serve
all processes), fails the test with the output's tail when any process exits non-zero, and kills
everything it started when ``timeout`` passes, so a hang fails instead of blocking CI.

Imported by name: tests directly in ``tests/`` can ``from distributed_helpers import ...``; tests in a
subfolder first put ``tests/`` on ``sys.path`` (see tests/training/test_engine.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

DEFAULT_TIMEOUT = 300.0
OUTPUT_TAIL = 4000


def cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it; another process could still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(cli_args: Sequence[str], cwd: Path, timeout: float = DEFAULT_TIMEOUT) -> str:
    """``python -m pipeline.cli *cli_args`` in one process; returns its output."""
    return _run_all([[sys.executable, "-m", "pipeline.cli", *cli_args]], cwd, timeout)[0]


def run_torchrun(cli_args: Sequence[str], cwd: Path, nproc_per_node: int = 2,
                 timeout: float = DEFAULT_TIMEOUT) -> str:
    """``torchrun --standalone --nproc-per-node=N -m pipeline.cli *cli_args``; returns its output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc_per_node}", "-m", "pipeline.cli", *cli_args]
    return _run_all([command], cwd, timeout)[0]


def node_command(cli_args: Sequence[str], nnodes: int, node_rank: int, nproc_per_node: int, port: int,
                 rdzv_id: str) -> list[str]:
    """The torchrun command of one node (what each machine would run, with 127.0.0.1 for node 0)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc_per_node}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}",
            f"--rdzv-conf=is_host={int(node_rank == 0)}", "-m", "pipeline.cli", *cli_args]


def run_nodes(cli_args: Sequence[str], cwd: Path, nnodes: int = 2, nproc_per_node: int = 1,
              timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    """Run ``pipeline.cli *cli_args`` as ``nnodes`` torchrun nodes on loopback; returns each node's output.

    World size is ``nnodes * nproc_per_node``. Ranks are assigned by the rendezvous, so a node's rank
    need not follow its ``--node-rank`` (as with c10d on real machines).
    """
    port, rdzv_id = free_port(), f"test-{uuid.uuid4().hex[:12]}"
    commands = [node_command(cli_args, nnodes, node, nproc_per_node, port, rdzv_id) for node in range(nnodes)]
    return _run_all(commands, cwd, timeout)


def _run_all(commands: Sequence[Sequence[str]], cwd: Path, timeout: float) -> list[str]:
    """Start all commands at once, wait for all; assert each exited 0, killing all on a timeout."""
    logs = [tempfile.TemporaryFile("w+", encoding="utf-8") for _ in commands]
    procs: list[subprocess.Popen] = []
    try:
        for command, log in zip(commands, logs):
            # a session of its own: on a timeout the launcher and every worker it forked are killed
            procs.append(subprocess.Popen(list(command), cwd=cwd, env=cli_env(), stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout
        timed_out = False
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    report = "\n".join(f"--- process {i} (exit {p.returncode}): {' '.join(c[:8])} ...\n{o[-OUTPUT_TAIL:]}"
                       for i, (p, c, o) in enumerate(zip(procs, commands, outputs)))
    assert not timed_out, f"timed out after {timeout:.0f} s\n{report}"
    assert all(p.returncode == 0 for p in procs), report
    return outputs
