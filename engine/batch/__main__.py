"""Command line: `python -m engine.batch TASK --input IN --output OUT [options]`.

    python -m engine.batch caption --input photos/ --output captions.parquet
    python -m engine.batch detect  --input "shots/**/*.jpg" --labels "cat ; dog" --output boxes.jsonl
    python -m engine.batch segment --input table.parquet --bytes-column image --labels cat --output masks.parquet
    python -m engine.batch answer  --input list.jsonl --question "how many cats" --output answers.jsonl
    python -m engine.batch caption --input photos/ --output out.parquet --ray-address auto --workers 8

TASK: caption | answer | ocr | detect | segment | run (a free --prompt, sent as is).
Input: a directory (its image files, recursively), a glob, or a .parquet / .jsonl table whose
--path-column (default "path") holds image paths or whose --bytes-column (default "bytes") holds
encoded images (base64 text in JSON lines). Output: .parquet or .jsonl, one row per input
(see engine/batch/rows.py). Re-running over the same output resumes: ids already there are
skipped (--retry-errors runs the failed ones again). Without --ray-address a local Ray is started
for the job, sized to this machine.
User errors print one `error: ...` line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys

from ..runtime import BACKENDS, DEFAULT_BACKEND
from .spec import TASKS, BatchError, JobSpec, TaskSpec


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m engine.batch", description="PaliGemma batch jobs on Ray Data",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    p.add_argument("task", choices=TASKS)
    p.add_argument("--input", required=True, help="DIR, GLOB, FILE.parquet or FILE.jsonl")
    p.add_argument("--output", required=True, help="OUT.parquet or OUT.jsonl (re-running resumes it)")
    p.add_argument("--labels", help='detect / segment: objects to find, e.g. "cat ; dog"')
    p.add_argument("--question", help="answer: the question")
    p.add_argument("--prompt", help="run: the prompt, sent as is")
    p.add_argument("--lang", default="en", help="caption / answer language (default en)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="default: per task (caption/answer 64, ocr 128, detect 128, segment 256, run 64)")
    p.add_argument("--num-beams", type=_positive_int, default=1)
    p.add_argument("--model", help="exported artifact dir, or HF checkpoint dir (exported once, before the job, "
                                   "into the cache); default: the bundled default model")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=BACKENDS)
    p.add_argument("--weights", default="int8", help="weight format when --model is an HF checkpoint (default int8)")
    p.add_argument("--workers", type=_positive_int, help="Ray actors, each with its own model (default: as many "
                                                         "as the cluster's CPUs hold)")
    p.add_argument("--threads-per-worker", type=_positive_int, help="model threads per worker, reserved as Ray "
                                                                   "CPUs (default 2)")
    p.add_argument("--ray-address", help="join a running cluster: auto, or ray://HOST:10001 (default: start a "
                                         "local Ray for this job)")
    p.add_argument("--batch-size", type=_positive_int, default=16,
                   help="rows per batch, decoded together in one worker (default 16)")
    p.add_argument("--path-column", help="tables: the column of image paths (default: path)")
    p.add_argument("--bytes-column", help="tables: the column of image bytes (default: bytes)")
    p.add_argument("--id-column", help="tables: the unique row id (default: the path, else the row number)")
    p.add_argument("--retry-errors", action="store_true", help="resume: run the rows that failed again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (there is none off a terminal)")
    return p


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    task = TaskSpec(args.task, lang=args.lang, question=args.question, labels=args.labels, prompt=args.prompt,
                    max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    return JobSpec(task, args.input, args.output, model=args.model, backend=args.backend, weights=args.weights,
                   workers=args.workers, threads_per_worker=args.threads_per_worker, ray_address=args.ray_address,
                   path_column=args.path_column, bytes_column=args.bytes_column, id_column=args.id_column,
                   batch_size=args.batch_size, retry_errors=args.retry_errors,
                   progress=False if args.no_progress else None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import pyarrow  # noqa: F401
        import ray  # noqa: F401
    except ImportError as e:
        print(f"error: engine.batch needs Ray Data ({e}); install it with "
              "`pip install \"paligemma-edge[batch]\"` (or `pip install \"ray[data]\"`)", file=sys.stderr)
        return 2
    import logging

    import ray.data  # noqa: F401 - sets up Ray Data's loggers, whose chatter the command quiets next
    logging.getLogger("ray.data").setLevel(logging.ERROR)   # the command prints its own progress and summary
    from .job import run_job
    try:
        summary = run_job(spec_from_args(args))
    except KeyboardInterrupt:
        print("interrupted: the rows finished so far are saved; run the same command again to resume",
              file=sys.stderr)
        return 130
    except (BatchError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.format(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
