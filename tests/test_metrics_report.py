"""`kaldrix serve --report`: the performance report on stdout when the server stops."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(rb"listening on ws://127\.0\.0\.1:(\d+)/ws")


async def test_report_printed_at_shutdown():
    env = {k: v for k, v in os.environ.items() if not k.startswith("KALDRIX_")}
    env["PYTHONPATH"] = str(ROOT)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "kaldrix", "serve", "--port", "0", "--no-simulate", "--report"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        with trio.fail_after(15):
            buffer = b""
            while not LISTENING.search(buffer):
                chunk = await process.stderr.receive_some(4096)
                assert chunk, buffer.decode(errors="replace")
                buffer += chunk
            process.send_signal(signal.SIGTERM)
            stdout = b""
            while chunk := await process.stdout.receive_some(4096):
                stdout += chunk
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
    text = stdout.decode()
    assert text.startswith("kaldrix Performance Report\n")
    for line in ("Event Delivery Performance:", "- 99.9th Percentile:", "Connection Statistics:", "Verdict:"):
        assert line in text
