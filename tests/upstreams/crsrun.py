"""The real claude-relay-service 1.1.314 (from ../shared/upstreams) and the fake, as the CRS
tests start them: a copy of CRS's source in a temp dir, its node_modules from `npm ci` cached
under /tmp/keyportal-crs-node-<lockfile hash> (symlinked into each copy), Redis on a free
port, a mock Anthropic server on 127.0.0.1 added as a claude-console account, `node
src/app.js` on another free port, all started once per session and stopped by pid (the
fixtures are in tests/upstreams/conftest.py). Skipped when the source, node, npm or
redis-server is missing (scripts/crs.sh installs the tools)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from pool.upstreams.crs import CrsClient, UsageRecord

from tests.fakes.crs import MODEL, PASSWORD, USAGE, USERNAME, FakeCrs
from tests.realproxy import shared_dir

_SHARED = shared_dir()  # ../shared, found from a git worktree too
SOURCE = (_SHARED or Path("/nonexistent")) / "upstreams" / "claude-relay-service"
START_SECONDS = 90


@dataclass
class Relay:
    kind: str
    url: str
    client: Callable[[], CrsClient]

    def message(self, value: str) -> requests.Response:
        return requests.post(
            f"{self.url}/api/v1/messages",
            headers={"x-api-key": value, "anthropic-version": "2023-06-01"},
            json={"model": MODEL, "max_tokens": 16,
                  "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MockAnthropic(BaseHTTPRequestHandler):
    """Answers every message with USAGE; `served` counts the messages answered."""

    protocol_version = "HTTP/1.1"
    served = 0
    _lock = threading.Lock()

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with MockAnthropic._lock:
            MockAnthropic.served += 1
        data = json.dumps({
            "id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
            "model": MODEL, "content": [{"type": "text", "text": "ok"}],
            "stop_reason": "end_turn", "stop_sequence": None, "usage": USAGE,
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _node_modules(work: Path) -> float:
    """Links a cached node_modules into `work`, running `npm ci` first when there is none
    for this lockfile; returns the seconds npm took (0 when cached)."""
    digest = hashlib.sha256((SOURCE / "package-lock.json").read_bytes()).hexdigest()[:16]
    # The cache holds a folder named node_modules: node resolves a package's own requires
    # from its real path, walking up to the nearest node_modules.
    cache = Path(f"/tmp/keyportal-crs-node-{digest}")
    took = 0.0
    if not (cache / "node_modules").is_dir():
        started = time.monotonic()
        subprocess.run(["npm", "ci", "--omit=dev", "--no-audit", "--no-fund", "--ignore-scripts"],
                       cwd=work, check=True, capture_output=True, timeout=600)
        took = time.monotonic() - started
        staged = Path(f"{cache}.{os.getpid()}")
        staged.mkdir()
        shutil.move(str(work / "node_modules"), staged / "node_modules")
        try:
            staged.rename(cache)  # atomic: a parallel run either wins or finds it there
        except OSError:
            shutil.rmtree(staged, ignore_errors=True)
    (work / "node_modules").symlink_to(cache / "node_modules")
    return took


def _wait_for(url: str, deadline: float, process: subprocess.Popen[bytes], log: Path) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"CRS exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    pytest.fail(f"CRS did not answer within {START_SECONDS} s: {log.read_text()[-2000:]}")


def start_real_crs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    if not (SOURCE / "src" / "app.js").is_file():
        pytest.skip(f"no claude-relay-service source at {SOURCE}")
    missing = [tool for tool in ("node", "npm", "redis-server") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (bash scripts/crs.sh)")
    started = time.monotonic()
    work = tmp_path_factory.mktemp("crs")
    shutil.copytree(SOURCE, work, dirs_exist_ok=True, ignore=shutil.ignore_patterns("node_modules"))
    npm_seconds = _node_modules(work)
    processes: list[subprocess.Popen[bytes]] = []
    mock = ThreadingHTTPServer(("127.0.0.1", 0), MockAnthropic)
    mock.daemon_threads = True
    threading.Thread(target=mock.serve_forever, daemon=True).start()
    try:
        redis_port, port = _free_port(), _free_port()
        processes.append(subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1",
               "JWT_SECRET": "contract-test-jwt-secret-at-least-32-chars",
               "ENCRYPTION_KEY": "0123456789abcdef0123456789abcdef",
               "ADMIN_USERNAME": USERNAME, "ADMIN_PASSWORD": PASSWORD,
               "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(redis_port), "NODE_ENV": "production"}
        (work / ".env").write_text("".join(f"{k}={env[k]}\n" for k in (
            "PORT", "HOST", "JWT_SECRET", "ENCRYPTION_KEY", "ADMIN_USERNAME", "ADMIN_PASSWORD",
            "REDIS_HOST", "REDIS_PORT")))
        shutil.copy(work / "config" / "config.example.js", work / "config" / "config.js")
        subprocess.run(["node", "scripts/setup.js"], cwd=work, env=env, check=True,
                       capture_output=True, timeout=60)
        log = work / "crs.log"
        with log.open("wb") as out:
            crs = subprocess.Popen(["node", "src/app.js"], cwd=work, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
        processes.append(crs)
        url = f"http://127.0.0.1:{port}"
        _wait_for(f"{url}/health", time.monotonic() + START_SECONDS, crs, log)
        login = requests.post(f"{url}/web/auth/login",
                              json={"username": USERNAME, "password": PASSWORD}, timeout=10)
        added = requests.post(
            f"{url}/admin/claude-console-accounts",
            headers={"Authorization": f"Bearer {login.json()['token']}"},
            json={"name": "mock", "apiUrl": f"http://127.0.0.1:{mock.server_address[1]}",
                  "apiKey": "upstream-dummy", "accountType": "shared", "priority": 50},
            timeout=10)
        assert added.status_code == 200, added.text
        print(f"\nreal CRS ready in {time.monotonic() - started:.1f} s "
              f"(npm ci {npm_seconds:.1f} s, {'cold' if npm_seconds else 'cached'})")
        yield Relay("real", url, lambda: CrsClient(url, USERNAME, PASSWORD, timeout=10))
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        mock.shutdown()
        mock.server_close()


def start_fake_crs() -> Iterator[Relay]:
    fake = FakeCrs().start()
    yield Relay("fake", fake.url, lambda: CrsClient(fake.url, USERNAME, PASSWORD, timeout=5))
    fake.stop()




def records_when_there(client: CrsClient, key_id: str, since: datetime | None, count: int
                       ) -> list[UsageRecord]:
    # CRS records usage after the answer has gone out: give it a moment, bounded.
    deadline = time.monotonic() + 10
    while True:
        records = client.usage_records(key_id, since=since).records
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


