"""Reads LeakSanitizer reports (log_path files) and fails on the leaks that are ours.

A leak is ours when a frame of its allocation stack is in our extension (engine/_native*.so,
or a source file under csrc/). Leaks that CPython, numpy, onnxruntime or OpenVINO keep until
exit on purpose are counted and summarised, not failed: whatever Python code caused them, the
allocation did not pass through our code. Prints every leak of ours in full.

    python tests/native/lsan_report.py REPORT...      (exit status 1 when a leak is ours)
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

HEADER = re.compile(r"^(Direct|Indirect) leak of (\d+) byte\(s\) in (\d+) object\(s\) allocated from:")
OURS = re.compile(r"_native\.cpython|_native\.so|/csrc/")


@dataclass
class Leak:
    kind: str            # "Direct" or "Indirect"
    size: int            # bytes
    objects: int
    frames: list[str]

    @property
    def ours(self) -> bool:
        return any(OURS.search(f) for f in self.frames)

    def where(self) -> str:
        """The first frame that is not the allocator itself."""
        for f in self.frames[1:]:           # frame #0 is the sanitizer's malloc / new
            if not re.search(r"(malloc|calloc|realloc|operator new|aligned_alloc|posix_memalign)\b", f):
                return f.split(" in ", 1)[-1].strip()
        return self.frames[0] if self.frames else "?"


def parse(text: str) -> list[Leak]:
    leaks: list[Leak] = []
    current = None
    for line in text.splitlines():
        m = HEADER.match(line.strip())
        if m:
            current = Leak(m.group(1), int(m.group(2)), int(m.group(3)), [])
            leaks.append(current)
        elif current is not None and line.strip().startswith("#"):
            current.frames.append(line.strip())
        elif current is not None and not line.strip():
            current = None
    return leaks


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv if Path(a).is_file()]
    leaks = [leak for p in paths for leak in parse(p.read_text(errors="replace"))]
    text = "".join(p.read_text(errors="replace") for p in paths)
    if "ERROR: AddressSanitizer" in text or "runtime error:" in text:
        print(text)
        print("lsan_report: the leak run also reported a memory error (above)")
        return 1
    ours = [leak for leak in leaks if leak.ours]
    others = [leak for leak in leaks if not leak.ours]
    for leak in ours:
        print(f"{leak.kind} leak of {leak.size} bytes in {leak.objects} objects, allocated from:")
        print("\n".join("    " + f for f in leak.frames))
    print(f"lsan_report: {len(paths)} report(s); {len(ours)} leaks through our extension "
          f"({sum(x.size for x in ours)} bytes); {len(others)} elsewhere (CPython / numpy / runtimes, "
          f"{sum(x.size for x in others)} bytes, not ours)")
    top: dict[str, int] = {}
    for leak in others:
        top[leak.where()] = top.get(leak.where(), 0) + leak.size
    for where, size in sorted(top.items(), key=lambda kv: -kv[1])[:5]:
        print(f"    not ours: {size:>9} bytes  {where[:140]}")
    return 1 if ours else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
