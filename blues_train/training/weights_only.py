"""DeepSpeed's `.pt` checkpoint files, loaded without running any code they hold.

DeepSpeed reads its state files with `torch.load(weights_only=False)`, a full unpickler: a
crafted `mp_rank_00_model_states.pt` runs any command on resume. Inside
`weights_only_loads()` every `torch.load` of the process (DeepSpeed's, the universal
conversion's) is a weights-only load: tensors, containers, numbers and strings, plus exactly
the DeepSpeed types that ZeRO-2 states hold (`ALLOWED`). A file holding anything else is
refused with one line naming it.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from contextlib import contextmanager

import torch

from blues_train.io.errors import BluesError
from blues_train.training.deepspeed_import import import_deepspeed


def allowed_types() -> list[type]:
    """What a ZeRO-2 checkpoint (optimizer shards and the universal copy) pickles besides
    tensors and builtins, found with `torch.serialization.get_unsafe_globals_in_checkpoint`."""
    import_deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextmanager
def weights_only_loads():
    """Within the block, `torch.load` is weights-only with the allowlist, whatever its caller asks."""
    original = torch.load
    allowed = allowed_types()

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, **kwargs):
        with torch.serialization.safe_globals(allowed):
            try:
                return original(f, map_location=map_location, weights_only=True, **kwargs)
            except pickle.UnpicklingError as exc:
                raise BluesError(f"{f}: refused to load: {refusal_reason(exc)}; a Blues checkpoint "
                                 "holds only tensors and DeepSpeed's state, so this file was "
                                 "altered: do not use this checkpoint") from None
            except (EOFError, RuntimeError, zipfile.BadZipFile) as exc:
                raise BluesError(f"{f}: not a readable checkpoint file ({exc}); "
                                 "pick another checkpoint") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def refusal_reason(exc: pickle.UnpicklingError) -> str:
    """The one line of torch's long weights-only message that says what was refused."""
    for line in str(exc).splitlines():
        if re.search(r"unsupported|not an allowed|blocked", line, re.IGNORECASE):
            return line.strip().rstrip(".")
    return "it holds Python objects other than tensors"
