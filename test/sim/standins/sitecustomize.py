"""With this folder on PYTHONPATH, every Python process (torchrun workers included) starts with the stand-ins installed.

The package is loaded from its file here (importable afterwards as `standins`) so the folder above need not be on
sys.path. Set NXDI_GEMMA_SIM_MODE=cpu|xla (default cpu); NXDI_GEMMA_SIM_STANDINS=0 turns the hook off.
"""

import importlib.util
import os
import sys

if os.environ.get("NXDI_GEMMA_SIM_STANDINS", "1") != "0" and "standins" not in sys.modules:
    _here = os.path.dirname(os.path.abspath(__file__))
    _spec = importlib.util.spec_from_file_location("standins", os.path.join(_here, "__init__.py"),
                                                   submodule_search_locations=[_here])
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["standins"] = _module
    _spec.loader.exec_module(_module)
    _module.install()
