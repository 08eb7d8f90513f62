"""End-to-end benchmark: our engine against transformers (PyTorch) on the same model and machine.

    python -m engine.bench [--preset paligemma-3b-224 | --checkpoint DIR] [--systems ...]
                           [--weights ...] [--workload caption,detect3] [--new-tokens 32]
                           [--repeats N] [--threads N] [--out DIR] [--quick]

Modules:
    __main__.py   command line and orchestration: checkpoint and exports (cached), the memory
                  bandwidth probe, one fresh worker process per sample, interleaved repeats
    workers.py    the worker entry point (`python -m engine.bench.workers SPEC OUT`): export,
                  one engine sample (with the prefill / decode profiler) or one transformers
                  sample, each running the workloads (caption, detect3)
    report.py     statistics, the bandwidth-bound decode limit, ratios, results.json / .md,
                  the stdout table and the chart

Nothing here is imported by the engine itself; torch and transformers are imported only inside
the transformers worker process.
"""
