"""Launching test processes: free ports (tests run side by side, `make test` uses pytest-xdist) and the accelerate
command of the 2-process equality tests."""

from __future__ import annotations

import socket
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port free on localhost now (accelerate's default 29500 may be held by a test running beside)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(processes: int = 2) -> list[str]:
    """``accelerate launch`` of ``processes`` CPU processes on a free port, without mixed precision or dynamo; the
    module and its arguments follow (``-m distillset.launch.cli ...``)."""
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
            str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]
