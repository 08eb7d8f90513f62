"""One reader of /proc/self/status for the tests that watch this process's memory (Linux)."""
from __future__ import annotations


def status_bytes(field: str) -> int:
    """A kB field of /proc/self/status in bytes (VmRSS, RssAnon, VmHWM, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")
