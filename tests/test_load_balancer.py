"""Two real `berry serve` replicas behind a real load balancer (HAProxy from Debian, health checks on /health):
a replica killed mid-run, then one shut down gracefully with SIGTERM, under streamed load from the openai client.

    client (openai, streams) --> HAProxy (leastconn, GET /health every 200 ms) --> replica a | replica b
HAProxy names the replica that answered in an X-Berry-Replica response header; its admin socket gives its view
of the replicas (UP/DOWN). The model is the small embedded berry-chat; the whole module takes ~1 minute.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

MODEL = "berry-chat"
MAX_TOKENS = 800  # streams long enough to be cut mid-run (ignore_eos: they all run to the limit)
DRAIN_DELAY = 2.5  # seconds a SIGTERMed replica keeps serving with /health failing
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


class Replica:
    def __init__(self, name: str, log_dir: Path):
        self.name, self.port, self.log_dir, self.proc = name, free_port(), log_dir, None

    def start(self) -> None:
        berry = Path(sys.executable).parent / "berry"
        log = open(self.log_dir / f"replica-{self.name}.log", "a")
        # its own session: the kill below takes the HTTP process and its engine process together
        self.proc = subprocess.Popen([str(berry), "serve", MODEL, "--port", str(self.port), "--threads", "1",
                                      "--drain-delay", str(DRAIN_DELAY), "--drain-timeout", "60"],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def health(self, probe: str = "ready") -> int | None:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health", params={"probe": probe}, timeout=2).status_code
        except httpx.HTTPError:
            return None

    def wait_healthy(self) -> None:
        def up():
            assert self.proc.poll() is None, (self.log_dir / f"replica-{self.name}.log").read_text()
            return self.health() == 200
        wait_for(up, 120, f"replica {self.name} to load its model", step=0.25)

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal_group(signal.SIGKILL)
            self.proc.wait(timeout=30)


class HAProxy:
    def __init__(self, replicas: list[Replica], workdir: Path):
        self.port, self.sock = free_port(), workdir / "haproxy.sock"
        servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.port} check" for r in replicas)
        self.cfg = workdir / "haproxy.cfg"
        self.cfg.write_text(f"""global
    stats socket {self.sock} mode 600 level admin
    maxconn 200
    log stderr format raw local0
defaults
    mode http
    log global
    option httplog
    timeout connect 1s
    timeout client 120s
    timeout server 120s
    # a request sent to a replica that died before the health check noticed goes to another one
    retries 2
    option redispatch 1
    retry-on conn-failure empty-response
frontend api
    bind 127.0.0.1:{self.port}
    default_backend berry
backend berry
    balance leastconn
    option httpchk GET /health
    http-check expect status 200
    default-server inter 200ms fall 2 rise 2
    http-response set-header X-Berry-Replica %[srv_name]
{servers}
""")
        r = subprocess.run(["haproxy", "-c", "-f", str(self.cfg)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(self.cfg)], stdout=subprocess.DEVNULL,
                                     stderr=open(workdir / "haproxy.log", "w"))

    def status(self) -> dict[str, str]:
        """The load balancer's view: server name -> UP / DOWN (its admin socket, `show stat`)."""
        assert self.proc.poll() is None, (self.sock.parent / "haproxy.log").read_text()
        if not self.sock.exists():  # still starting
            return {}
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.sock))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        head = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(head, ln.split(","))) for ln in lines[1:] if ln]
        return {r["svname"]: r["status"].split()[0] for r in rows
                if r["pxname"] == "berry" and r["svname"] not in ("BACKEND", "FRONTEND")}

    def wait_status(self, name: str, want: str, timeout: float) -> float:
        t0 = time.monotonic()
        wait_for(lambda: self.status().get(name) == want, timeout, f"HAProxy to see {name} {want}")
        return time.monotonic() - t0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@dataclass
class Stream:
    """One streamed chat completion through the load balancer, read in a thread."""
    client: openai.OpenAI
    replica: str | None = None
    chunks: int = 0
    finish: str | None = None
    completion_tokens: int | None = None
    error: BaseException | None = None
    ended_at: float | None = None
    started: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def run(self) -> Stream:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        try:
            raw = self.client.chat.completions.with_raw_response.create(
                model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True, temperature=0.8,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            self.replica = raw.headers.get("x-berry-replica")
            for chunk in raw.parse():
                self.chunks += 1
                if self.chunks >= 3:
                    self.started.set()
                if chunk.choices and chunk.choices[0].finish_reason:
                    self.finish = chunk.choices[0].finish_reason
                if chunk.usage is not None:
                    self.completion_tokens = chunk.usage.completion_tokens
        except BaseException as e:  # noqa: BLE001 - what the client saw is the observation
            self.error = e
        finally:
            self.ended_at = time.monotonic()
            self.started.set()

    def join(self, timeout: float = 120) -> Stream:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "a stream never ended"
        return self

    @property
    def complete(self) -> bool:
        return self.error is None and self.finish == "length" and self.completion_tokens == MAX_TOKENS


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy is not installed: `make install-test` installs Debian's haproxy")
    work = tmp_path_factory.mktemp("lb")
    replicas = [Replica("a", work), Replica("b", work)]
    lb = None
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_healthy()
        lb = HAProxy(replicas, work)
        for r in replicas:
            lb.wait_status(r.name, "UP", 10)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{lb.port}/v1", api_key="unused", max_retries=0,
                               timeout=120)
        yield {r.name: r for r in replicas}, lb, client
    finally:
        for r in replicas:
            r.stop()
        if lb is not None:
            lb.stop()


def served_by(client: openai.OpenAI) -> str:
    """One short request through the load balancer; the replica that answered it."""
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert raw.parse().choices[0].message.content is not None
    return raw.headers["x-berry-replica"]


def start_streams(client: openai.OpenAI, n: int) -> list[Stream]:
    streams = [Stream(client).run() for _ in range(n)]
    for s in streams:
        assert s.started.wait(60), "a stream sent nothing"
        assert s.error is None and s.finish is None, (s.error, s.finish)
    return streams


def test_killed_replica_fails_over_and_recovers(cluster):
    replicas, lb, client = cluster
    streams = start_streams(client, 4)
    on = {name: [s for s in streams if s.replica == name] for name in replicas}
    assert on["a"] and on["b"], [s.replica for s in streams]  # leastconn spreads them

    replicas["a"].signal_group(signal.SIGKILL)  # the HTTP process and its engine process, mid-stream
    replicas["a"].proc.wait(timeout=10)
    # new requests, before HAProxy's checks notice (a refused connection is retried on b) and after
    after_kill = [served_by(client) for _ in range(6)]
    lb.wait_status("a", "DOWN", 5)
    after_down = [served_by(client) for _ in range(4)]
    for s in streams:
        s.join()

    # the streams on the survivor ran to the end, untouched
    assert all(s.complete for s in on["b"]), [(s.error, s.finish, s.completion_tokens) for s in on["b"]]
    # the cut streams ended with an error the client saw: no silent truncation, no finish_reason
    for s in on["a"]:
        assert s.error is not None and s.finish is None and s.completion_tokens is None, (s.error, s.finish)
        assert isinstance(s.error, (httpx.RemoteProtocolError, openai.APIConnectionError, openai.APIError)), s.error
        assert s.chunks < MAX_TOKENS
    # new requests went only to the survivor, every one of them answered
    assert set(after_kill) == {"b"} and set(after_down) == {"b"}

    # the replica comes back: the load balancer sees it and sends it work again
    replicas["a"].start()
    replicas["a"].wait_healthy()
    lb.wait_status("a", "UP", 10)
    assert "a" in {served_by(client) for _ in range(6)}


def test_sigterm_drains_streams_and_fails_readiness_first(cluster):
    replicas, lb, client = cluster
    a = replicas["a"]
    streams = start_streams(client, 4)
    on_a = [s for s in streams if s.replica == "a"]
    assert on_a and len(on_a) < len(streams), [s.replica for s in streams]

    a.signal_group(signal.SIGTERM)  # the whole process group, as systemd would: the engine process stays up
    # readiness fails first: /health 503 while the replica still listens and its liveness stays 200
    wait_for(lambda: a.health() == 503, 2.0, "a's /health to fail")
    assert a.health("live") == 200
    lb.wait_status("a", "DOWN", DRAIN_DELAY)
    assert a.health() == 503  # still listening: HAProxy took it out before it stopped listening
    assert {served_by(client) for _ in range(4)} == {"b"}
    # then it stops listening, with its streams still going
    wait_for(lambda: a.health() is None, DRAIN_DELAY + 2, "a to stop listening")
    t_closed = time.monotonic()
    assert a.proc.poll() is None
    assert [s.ended_at for s in on_a if s.ended_at is not None and s.ended_at < t_closed] == []

    for s in streams:
        s.join()
    assert all(s.complete for s in streams), [(s.replica, s.error, s.finish, s.completion_tokens) for s in streams]
    assert a.proc.wait(timeout=30) == 0  # exits cleanly once its streams are done
    assert lb.status()["b"] == "UP"
