"""DeepSpeed as Blues imports it (blues_train/training/deepspeed_import.py): without MLflow,
and with its Muon modules standing in until something other than ZeRO's questions needs
them. Run in a fresh interpreter (the test process may hold the real modules)."""

import subprocess
import sys

CHECK = """
import sys
from blues_train.training.deepspeed_import import import_deepspeed
import_deepspeed()
import torch
# what ZeRO stage 1/2 runs at deepspeed.initialize and at every gradient reduction
from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
from deepspeed.runtime.zero.muon.original_muon import muon_update
optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
assert not isinstance(optimizer, MuonWithAuxAdam) and type(optimizer) in ZERO_SUPPORTED_OPTIMIZERS
print(sorted(m for m in ("mlflow", "torch._inductor.compile_fx") if m in sys.modules))
# a name the stand-in does not hold imports the real module
from deepspeed.runtime.zero.muon.original_muon import zeropower_via_newtonschulz5
print(zeropower_via_newtonschulz5.__module__, type(sys.modules[zeropower_via_newtonschulz5.__module__]).__name__)
"""


def test_zero_questions_import_neither_mlflow_nor_inductor_and_other_names_are_real():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-3:-1] == ["[]", "deepspeed.runtime.zero.muon.original_muon module"]
