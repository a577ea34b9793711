"""Process start-up of every Python process in a simulated vLLM run (the driver, `vllm serve`, vLLM's engine-core and
worker processes): with this folder first on PYTHONPATH, it installs the tier's closed-source stand-ins (`standins`,
through their own sitecustomize.py, which this one replaces on sys.path) and, when NXDI_GEMMA_SIM_VLLM=1, the
Neuron-machine stand-ins of vllm_standins.py."""

import importlib.util
import os
import runpy
import sys

_sim = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
runpy.run_path(os.path.join(_sim, "standins", "sitecustomize.py"))
if os.environ.get("NXDI_GEMMA_SIM_VLLM") == "1" and "vllm_standins" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("vllm_standins", os.path.join(_sim, "vllm_standins.py"))
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["vllm_standins"] = _module
    _spec.loader.exec_module(_module)
    _module.install()
