"""Running a test script on two CPU processes with `torch.distributed.run` (gloo), as `torchrun` would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def run_on_two_processes(script: Path, *arguments: str) -> list[str]:
    """Run `script` with `arguments` on two processes, offline and one thread each; assert it succeeded and that
    each process printed `processes: 2 index: <i>` (the script's proof that it saw the other), and return stdout's
    lines. Both processes share one stdout pipe, so a script must write that line with a single `os.write`: `print`
    with several arguments may issue several writes, and the two processes' pieces then interleave."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with socket.socket() as probe:  # a free port for the processes to meet on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    result = subprocess.run(
        [*torchrun, str(script), *arguments], capture_output=True, text=True, env=environment, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert sorted(line for line in lines if line.startswith("processes:")) == [
        "processes: 2 index: 0",
        "processes: 2 index: 1",
    ], f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-3000:]}"
    return lines
