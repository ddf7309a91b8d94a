"""Running the MONAI Label server as ``medssl label serve``'s child: say when it answers, and stop it with us."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request


def announce_when_ready(url: str, proc: subprocess.Popen, started: float, poll_s: float = 1.0) -> None:
    """Print one line (stderr) once ``GET url/info/`` answers 200, with the URL and the start-up time; stop
    polling if ``proc`` ends first."""
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/info/", timeout=5) as r:
                if r.status == 200:
                    print(f"medssl label serve: ready at {url} (started in {time.monotonic() - started:.0f} s)",
                          file=sys.stderr, flush=True)
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(poll_s)


def run_server(cmd: list[str], url: str) -> int:
    """Run the server command ``cmd`` until it ends and return its exit code. SIGTERM and SIGINT sent to this
    process (a service manager's stop, ``kill PID``, Ctrl-C) are forwarded to the server, which is waited for,
    so it never outlives us holding the port and the datastore."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd)

    def forward(signum, frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    threading.Thread(target=announce_when_ready, args=(url, proc, started), daemon=True).start()
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # a second Ctrl-C while waiting: keep waiting for the server to stop
                forward(signal.SIGINT, None)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
