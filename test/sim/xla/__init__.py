"""XLA tracing tier of the simulation: our NxDI classes traced through NxD's ModelBuilder HLO stage with real
torch-xla 2.9, the graphs replayed on PJRT CPU through NxDI's host code, and their HLO / XLA figures.

Modules: `env` (process setup: stand-ins in xla mode + our tracer), `lower` (generate_hlo, xla_hlo_call),
`replay` (ModelBuilder HLO stage, graph execution, NxDI-driven greedy), `stats` (HLO and XLA-dump figures),
`__main__` (CLI, `python -m xla --help` with test/sim on PYTHONPATH).
"""
