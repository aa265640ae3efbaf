"""DeepSpeed, imported without the MLflow and Muon imports it does not need.

`import deepspeed` imports its autotuner, which imports `mlflow` whenever it is installed
(Blues' tracking extra): 2.1 of the 2.5 s DeepSpeed takes to import (measured with
`python -X importtime`), at every training start and every command that reads a checkpoint.
Blues never runs the autotuner, so while DeepSpeed is first imported `mlflow` reads as
absent; Blues' own tracking imports it afterwards as usual.

ZeRO imports DeepSpeed's Muon modules at `deepspeed.initialize` and at every gradient
reduction, to ask whether the optimizer is a `MuonWithAuxAdam` and to bind `muon_update`
(called only for Muon's parameters); importing them wraps their kernels in `torch.compile`,
which imports TorchInductor (1.4 s of every training start, measured with `-X importtime`).
Blues trains with AdamW: until something else asks for more, those two modules are
stand-ins, whose `MuonWithAuxAdam` is a class no optimizer is an instance of and whose
`muon_update` imports the real module when called; any other name imports the real module.
"""

from __future__ import annotations

import importlib
import sys
import types

MUON = "deepspeed.runtime.zero.muon."


def import_deepspeed():
    """The deepspeed module, imported once without MLflow and Muon."""
    if "deepspeed" not in sys.modules:
        hidden = "mlflow" not in sys.modules
        if hidden:
            sys.modules["mlflow"] = None  # `import mlflow` raises ImportError, which DeepSpeed expects
        try:
            import deepspeed  # noqa: F401
        finally:
            if hidden and sys.modules.get("mlflow", False) is None:
                del sys.modules["mlflow"]
    sys.modules.setdefault(MUON + "muon_optimizer", MuonStandIn(MUON + "muon_optimizer"))
    sys.modules.setdefault(MUON + "original_muon", MuonStandIn(MUON + "original_muon"))
    return sys.modules["deepspeed"]


class MuonStandIn(types.ModuleType):
    """One of DeepSpeed's Muon modules before anyone uses Muon."""

    class MuonWithAuxAdam:
        """No optimizer Blues builds is one."""

    def muon_update(self, *args, **kwargs):
        return self.real().muon_update(*args, **kwargs)

    def real(self) -> types.ModuleType:
        """The module itself, imported now in place of this stand-in."""
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return importlib.import_module(self.__name__)

    def __getattr__(self, name: str):
        if name.startswith("__"):  # the import system's questions (`__path__`, `__file__`): a plain module
            raise AttributeError(name)
        return getattr(self.real(), name)
