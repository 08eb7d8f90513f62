"""Fuzz targets (atheris) for everything that reads bytes a user hands the engine.

    python -m fuzz.run                      # every target, 1M inputs each (see README "Fuzzing")
    python -m fuzz.run --runs 2000 image    # one target, a bounded run

Each target feeds arbitrary input to one reader and lets only `engine.errors.EngineError`
(and its subclasses) through: any other exception, a crash, a hang or a memory blow-up is a
finding. The seed corpus lives in fuzz/corpus/<target>/ (made by `python -m fuzz.make_seeds`).
"""
