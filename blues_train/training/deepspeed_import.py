"""DeepSpeed, imported without the MLflow import it does not need.

`import deepspeed` imports its autotuner, which imports `mlflow` whenever it is installed
(Blues' tracking extra): 2.1 of the 2.5 s DeepSpeed takes to import (measured with
`python -X importtime`), at every training start and every command that reads a checkpoint.
Blues never runs the autotuner, so while DeepSpeed is first imported `mlflow` reads as
absent; Blues' own tracking imports it afterwards as usual.
"""

from __future__ import annotations

import sys


def import_deepspeed():
    """The deepspeed module, imported once without MLflow."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hidden = "mlflow" not in sys.modules
    if hidden:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError, which DeepSpeed expects
    try:
        import deepspeed
    finally:
        if hidden and sys.modules.get("mlflow", False) is None:
            del sys.modules["mlflow"]
    return deepspeed
