"""Multi-node training with torchrun: two launchers ("nodes") on this machine, c10d rendezvous, gloo, against one
process with the same global batch; then one node is killed mid-run and comes back, and the run resumes from its
last checkpoint and ends where the uninterrupted one-process run ends.

    node a: torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT ... (hosts
            the rendezvous store: started first)
    node b: the same command; SIGKILLed (launcher and worker) after a checkpoint, then started again
Node a's worker sees its peer vanish (gloo: connection reset) and exits; node a's launcher restarts it
(--max-restarts) and waits in the rendezvous until node b is back; both workers start with --resume and continue
from the checkpoint. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with the shared store (torch's default) a restarted
node cannot rejoin a surviving one (both wait for each other's rank info, pytorch/pytorch#147064).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import berrylm.cli as berry
from berrylm.model.checkpoint import load_checkpoint, load_train_state
from tests.test_train import ROOT, TINY_SET, shards, step_losses  # noqa: F401 - shards is a fixture

STEPS, CKPT_EVERY = 40, 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(out: Path, data: Path) -> list[str]:
    return ["train", "pretrain", "--data", str(data), "--preset", "berry-1.8m", *TINY_SET, "--steps", str(STEPS),
            "--batch-tokens", "256", "--seq-len", "32", "--micro-batch", "4", "--warmup", "1", "--threads", "1",
            "--log-every", "1", "--eval-every", "1000", "--sample-every", "1000", "--ckpt-every", str(CKPT_EVERY),
            "--resume", "--out", str(out)]


class Node:
    """One torchrun launcher: a node of the job."""

    def __init__(self, name: str, port: int, args: list[str], logs: Path):
        self.name, self.port, self.args, self.logs, self.proc, self.starts = name, port, args, logs, None, 0

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
        self.starts += 1
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{self.port}", "--rdzv-id", "berry-test",
             "--rdzv-conf", "join_timeout=120,keep_alive_interval=1,keep_alive_max_attempt=2",
             "--max-restarts", "1", "--monitor-interval", "0.2", "-m", "berrylm", *self.args],
            cwd=ROOT, env=env, stdout=open(self.log, "a"), stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def log(self) -> Path:
        return self.logs / f"node-{self.name}.log"

    def processes(self) -> list[int]:
        """The launcher and its workers (torchrun starts each worker in a session of its own)."""
        def tree(pid: int) -> list[int]:
            out = [pid]
            for task in Path(f"/proc/{pid}/task").iterdir():
                out += [c for child in (task / "children").read_text().split() for c in tree(int(child))]
            return out
        return tree(self.proc.pid)

    def kill(self) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)


def logged_steps(run: Path) -> dict[int, float]:
    try:
        return step_losses(run)
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line half-written
        return {}


@pytest.mark.timeout(300)
def test_two_nodes_match_one_and_a_killed_node_resumes(shards, tmp_path):  # noqa: F811
    # the reference: one process, the same global batch (256 tokens a step)
    assert berry.main(train_args(tmp_path / "one", shards)) == 0
    one = step_losses(tmp_path / "one")
    assert sorted(one) == list(range(1, STEPS + 1))

    run, port = tmp_path / "two", free_port()
    a, b = (Node(n, port, train_args(run, shards), tmp_path) for n in "ab")
    try:
        a.start()
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:  # a hosts the rendezvous store
            assert a.proc.poll() is None and time.monotonic() < deadline, a.log.read_text()[-3000:]
            time.sleep(0.1)
        b.start()
        deadline = time.monotonic() + 120
        while max(logged_steps(run), default=0) < 2 * CKPT_EVERY + 2:  # past a checkpoint or two
            assert a.proc.poll() is None and b.proc.poll() is None, a.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the two-node run did not get going"
            time.sleep(0.02)
        b.kill()
        before = logged_steps(run)
        killed_at = max(before)
        assert killed_at < STEPS, "the run ended before the kill: make it longer"
        # two nodes, up to the kill, trained exactly what one process trained
        for s in before:
            assert before[s] == pytest.approx(one[s], abs=1e-5), s
        assert a.proc.poll() is None  # the surviving node waits for the lost one
        b.start()
        assert a.proc.wait(timeout=180) == 0, a.log.read_text()[-3000:]
        assert b.proc.wait(timeout=60) == 0, b.log.read_text()[-3000:]
    finally:
        for n in (a, b):
            if n.proc is not None and n.proc.poll() is None:
                n.kill()

    out = a.log.read_text() + b.log.read_text()
    assert "world 2" in out
    resumed = [int(x.split()[0]) for x in out.split("resuming at step ")[1:]]
    assert len(resumed) == 1 and resumed[0] % CKPT_EVERY == 0 and 0 < resumed[0] <= killed_at, resumed
    # the resumed run's curve is the uninterrupted one-process curve, step for step
    two = step_losses(run)
    assert sorted(two) == list(range(1, STEPS + 1))
    for s in one:
        assert two[s] == pytest.approx(one[s], abs=1e-5), s
    assert load_train_state(run / "checkpoint")["tokens_seen"] == STEPS * 256
    x, _ = load_checkpoint(tmp_path / "one" / "checkpoint")
    y, _ = load_checkpoint(run / "checkpoint")
    for (k, p), q in zip(x.state_dict().items(), y.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-5), k
