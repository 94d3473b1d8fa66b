"""`tally bench`: co-location benchmark of high-priority inference next to best-effort training.

Modules (see docs/bench.md):
  workloads  registry of workloads (PyTorch models, CUDA microbenchmark, fakes for CPU tests)
  traces     arrival traces: Azure Functions 2021 CSV, synthetic bursty, Poisson
  metrics    latency percentiles, overhead, normalized and system throughput
  worker     the process that runs one workload (HP open-loop server or BE trainer)
  systems    how each sharing system is started, stopped and applied to a process
  runner     orchestration of runs, resume, cleanup; `run_pair` Python API
  report     aggregate markdown table and PNG charts
  cli        `tally bench`

Nothing here imports torch: only the worker process does, when it builds a
PyTorch workload.
"""
