"""The one loop: build a run (data, starting point, model, backend), train it step by step, evaluate, log, stop
on a signal; the run directory and its lock."""
