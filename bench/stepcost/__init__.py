"""The parts of ``bench/step_cost.py``: workloads, timing, the Trainer, loop and AMP-loop configurations,
bookkeeping and memory measurements. Imported by that script (``bench/`` is on its ``sys.path``)."""
