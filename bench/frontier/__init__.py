"""The parts of ``bench/frontier.py``: ``tasks`` (tasks, schedules, expected passes), ``runs`` (interleaved, timed
training through ``SSAMTrainer``) and ``report`` (statistics, table, verdict, plot)."""
