"""What the serving benchmarks share: start `imagine serve` on a free loopback port, wait for it, and
read its resident memory."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(out: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`imagine serve` with ``args`` on a free port; returns (process, base URL) once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "imagine", "serve", "--port", str(port), "--out", str(out), *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/api/v1/status", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit(f"the server did not start: {server.stderr.read()[-2000:]}")


def run_clients(client, clients: int, server_pid: int) -> list[float]:
    """``client(k)`` in ``clients`` threads until they all return; the server's RSS (MB) sampled every second
    meanwhile, returned."""
    import threading

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    memory = []
    while any(t.is_alive() for t in threads):
        memory.append(rss_mb(server_pid))
        time.sleep(1)
    return memory


def png_base64(image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
