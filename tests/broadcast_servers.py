"""Real broadcast servers for tests: Debian's nginx + libnginx-mod-rtmp, and Debian's janus.

Each runs in the foreground in its own temporary folder with its own config (templates in
tests/servers/), on free loopback ports, and is stopped (by its pid) when the test ends.
Tests skip when the Debian package is missing (`./setup.sh --dev` installs it).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

SERVERS = Path(__file__).parent / "servers"
NGINX = "/usr/sbin/nginx"
RTMP_MODULE = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")
JANUS = shutil.which("janus") or "/usr/bin/janus"
JANUS_LIB = Path("/usr/lib/x86_64-linux-gnu/janus")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class NginxRtmp:
    """nginx with the RTMP module: publishes to rtmp://127.0.0.1:PORT/live/NAME are recorded
    to records/NAME-<unix time>.flv (one file per publish)."""

    def __init__(self, folder: Path, port: int | None = None):
        if not (Path(NGINX).exists() and RTMP_MODULE.exists()):
            pytest.skip("needs Debian nginx + libnginx-mod-rtmp (./setup.sh --dev)")
        self.dir = folder
        self.port = port or free_port()
        (folder / "records").mkdir(parents=True, exist_ok=True)
        conf = (SERVERS / "nginx-rtmp.conf.template").read_text().format(dir=folder, port=self.port)
        (folder / "nginx.conf").write_text(conf)
        self.proc: subprocess.Popen | None = None

    def url(self, name: str) -> str:
        return f"rtmp://127.0.0.1:{self.port}/live/{name}"

    def start(self) -> "NginxRtmp":
        self.proc = subprocess.Popen([NGINX, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None

    def records(self, name: str) -> list[Path]:
        return sorted((self.dir / "records").glob(f"{name}*.flv"), key=lambda p: p.stat().st_mtime)


JANUS_CONF = """general: {{
    configs_folder = "{dir}"
    plugins_folder = "{lib}/plugins"
    transports_folder = "{lib}/transports"
    events_folder = "{lib}/events"
    loggers_folder = "{lib}/loggers"
    debug_level = 4
}}
media: {{ rtp_port_range = "{rtp_low}-{rtp_high}" }}
nat: {{ nice_debug = false ice_enforce_list = "{interfaces}" }}
plugins: {{ disable = "{disable_plugins}" }}
transports: {{ disable = "libjanus_websockets.so,libjanus_mqtt.so,libjanus_nanomsg.so,libjanus_pfunix.so,libjanus_rabbitmq.so" }}
loggers: {{ disable = "libjanus_jsonlog.so" }}
events: {{ broadcast = false }}
"""
JANUS_HTTP = """general: {{ json = "plain" base_path = "/janus" http = true port = {port} ip = "127.0.0.1" https = false }}
admin: {{ admin_http = false }}
"""
JANUS_VIDEOROOM = "general: {{ }}\n"


def _interfaces() -> str:
    """Every IPv4 address of this machine: Janus' ICE skips loopback, so both sides also meet on
    the machine's own (non-loopback) address; no packet leaves the host."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return ",".join([a for a in out if ":" not in a] or ["127.0.0.1"])


class JanusGateway:
    """Debian's janus with only the VideoRoom plugin and the HTTP transport, on a free port."""

    def __init__(self, folder: Path):
        if not Path(JANUS).exists() or not (JANUS_LIB / "plugins" / "libjanus_videoroom.so").exists():
            pytest.skip("needs Debian janus (./setup.sh --dev)")
        self.dir = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        rtp_low = 20000 + (self.port % 200) * 100
        plugins = sorted(p.name for p in (JANUS_LIB / "plugins").glob("libjanus_*.so")
                         if p.name != "libjanus_videoroom.so")
        (folder / "janus.jcfg").write_text(JANUS_CONF.format(
            dir=folder, lib=JANUS_LIB, rtp_low=rtp_low, rtp_high=rtp_low + 99,
            interfaces=_interfaces(), disable_plugins=",".join(plugins)))
        (folder / "janus.transport.http.jcfg").write_text(JANUS_HTTP.format(port=self.port))
        (folder / "janus.plugin.videoroom.jcfg").write_text(JANUS_VIDEOROOM.format())
        self.proc: subprocess.Popen | None = None
        self.log = folder / "janus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/janus"

    def start(self, timeout: float = 20.0) -> "JanusGateway":
        self.proc = subprocess.Popen([JANUS, "-F", str(self.dir), "-C", str(self.dir / "janus.jcfg")],
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"janus exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/info", timeout=1) as r:
                    if "janus.plugin.videoroom" in json.load(r).get("plugins", {}):
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"janus did not answer in {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None
