"""Run the fuzz targets one after another and print inputs run, time and rate per target.

    python -m fuzz.run                               # all targets, 1,000,000 inputs each
    python -m fuzz.run --runs 2000 --max-seconds 20 safetensors image
    python -m fuzz.run --list

Each target runs in its own process (libFuzzer exits when it is done): the seeds in
fuzz/corpus/<target>/ are read, new interesting inputs go to a scratch corpus (kept with
--keep-corpus DIR), and an input that escapes with anything but an EngineError, crashes, runs
past --timeout seconds or past --rss-mb is written to fuzz/findings/<target>/ and fails the run.
Exit status 0 only when every target finished its runs without a finding.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGETS = ("safetensors", "checkpoint", "manifest", "parsers", "tokenizer", "image", "masks")
MAX_LEN = {"safetensors": 4096, "checkpoint": 16384, "manifest": 16384, "parsers": 1024,
           "tokenizer": 2048, "image": 8192, "masks": 65536}
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_STAT = re.compile(r"^#(\d+)\s+(?:pulse|NEW|REDUCE|DONE|INITED)\b.*?cov: (\d+)", re.M)


@dataclass
class Result:
    target: str
    runs: int
    seconds: float
    coverage: int | None
    finding: str | None          # None: clean; else the reason and the saved input

    @property
    def rate(self) -> float:
        return self.runs / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        status = "ok" if self.finding is None else f"FINDING: {self.finding}"
        cov = f", cov {self.coverage}" if self.coverage is not None else ""
        return (f"{self.target:12s} {self.runs:9d} inputs in {self.seconds:8.1f} s "
                f"({self.rate:8.0f}/s{cov})  {status}")


def run_target(target: str, runs: int, max_seconds: int | None, timeout: int, rss_mb: int,
               corpus_out: Path, log: Path | None = None) -> Result:
    """One libFuzzer run of fuzz/fuzz_<target>.py; returns what it did."""
    seeds = HERE / "corpus" / target
    findings = HERE / "findings" / target
    findings.mkdir(parents=True, exist_ok=True)
    corpus_out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", f"fuzz.fuzz_{target}", str(corpus_out), str(seeds),
           f"-runs={runs}", f"-max_len={MAX_LEN[target]}", f"-timeout={timeout}",
           f"-rss_limit_mb={rss_mb}", f"-artifact_prefix={findings}{os.sep}", "-print_final_stats=1"]
    if max_seconds:
        cmd.append(f"-max_total_time={max_seconds}")
    # libFuzzer's output goes straight to a file (the --log file, so that a long run can be
    # watched with tail -f), and is read back from where this run started.
    with open(log or corpus_out.parent / f".{target}.log", "ab+") as sink:
        start = sink.seek(0, os.SEEK_END)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - t0
        sink.seek(start)
        out = sink.read().decode("utf-8", "replace")
    done = _DONE.search(out)
    stats = _STAT.findall(out)
    runs_done = int(done.group(1)) if done else (int(stats[-1][0]) if stats else 0)
    coverage = int(stats[-1][1]) if stats else None
    finding = None
    if proc.returncode != 0 or not done:
        saved = re.findall(r"Test unit written to (\S+)", out)
        reason = _reason(out)
        finding = f"{reason} (exit {proc.returncode}{', input ' + saved[-1] if saved else ''})"
    return Result(target, runs_done, seconds, coverage, finding)


def _reason(out: str) -> str:
    for pattern in (r"=== Uncaught Python exception: ===\n(.+)", r"ERROR: libFuzzer: (.+)",
                    r"==\d+== ERROR: (.+)"):
        m = re.search(pattern, out)
        if m:
            return m.group(1).strip()
    tail = out.strip().splitlines()[-1:] or ["no output"]
    return tail[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n\n")[0])
    p.add_argument("targets", nargs="*", help=f"targets to run (default: all of {', '.join(TARGETS)})")
    p.add_argument("--runs", type=int, default=1_000_000, help="inputs per target (default 1,000,000)")
    p.add_argument("--max-seconds", type=int, default=None, help="stop a target after this long")
    p.add_argument("--timeout", type=int, default=60,
                   help="wall-clock seconds one input may take (default 60: on a loaded machine a "
                        "niced run gets little CPU, and a 0.1 s input can take 16 s of wall time)")
    p.add_argument("--rss-mb", type=int, default=2048, help="memory limit of a target (default 2048)")
    p.add_argument("--keep-corpus", type=Path, default=None,
                   help="directory for the grown corpus (default: a temporary one, deleted)")
    p.add_argument("--log", type=Path, default=None, help="append libFuzzer's output to this file")
    p.add_argument("--list", action="store_true", help="list the targets and exit")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(TARGETS))
        return 0
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        p.error(f"unknown target {unknown[0]!r}; targets: {', '.join(TARGETS)}")
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: pip install -e '.[fuzz]'", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="pg-fuzz-corpus-"))
    failed = False
    try:
        for target in args.targets or TARGETS:
            out = (args.keep_corpus / target) if args.keep_corpus else scratch / target
            r = run_target(target, args.runs, args.max_seconds, args.timeout, args.rss_mb, out, args.log)
            print(r.line(), flush=True)
            failed |= r.finding is not None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
