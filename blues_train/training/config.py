"""The training configuration: every setting of a `blues train` run, each default defined here once.

`TrainingConfig` is built by the `blues train` flags (one flag per field, the same names), by
`--training_config FILE.json` (the same fields as JSON; flags given too win), by the
`training` section of a project's config.json and its Dagster run config (pipelines/config.py),
and by the benchmarks. Library functions take it, never an argparse Namespace.

Architecture (`BluesConfig`, what the weights mean) is apart: `model` names it. The run-time
knobs `gradient_checkpointing`, `attn_backend`, `loss_chunk_tokens` and `attention_mask` are
fields here (`run_options()`), so a resumed run may change them; so may `router_balance`.
"""

from __future__ import annotations

import argparse
import os
import socket
import types
import typing
from pathlib import Path
from typing import Literal

from pydantic import Field

from blues_model import BluesConfig, RunOptions
from blues_model.config import ATTENTION_MASKS, ATTN_BACKENDS
from blues_train.io.errors import BluesError
from blues_train.io.settings import Settings, read_json, validated

DEFAULT_DS_CONFIG = Path(__file__).with_name("ds_config.json")
DEFAULT_SEQ_LEN = 1024  # or the model's max_seq_len, if smaller
_OPTIONS = RunOptions()
ROUTER_BALANCES = ("aux_loss", "bias", "both")


def free_port() -> int:
    """A free port on 127.0.0.1 for a process group's rendezvous (MASTER_PORT): never a fixed
    one, so that runs on one machine do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerator_env() -> dict[str, str]:
    """The environment DeepSpeed (its launcher, then each rank) needs to start on a machine
    without CUDA without guessing aloud ("Setting accelerator to CPU..."): the CPU, unless
    $DS_ACCELERATOR already says."""
    import torch

    if torch.cuda.is_available() or "DS_ACCELERATOR" in os.environ:
        return {}
    return {"DS_ACCELERATOR": "cpu"}


class TrainingConfig(Settings):
    """One `blues train` run."""

    data_cache_dir: str | None = Field(None, description="mixture folder (blues merge output); required")
    out: str = Field("runs/blues", description="run folder: metrics.jsonl, tensorboard/, checkpoints/")
    model: str | None = Field(None, description="preset (blues-01, tiny) or a BluesConfig JSON file; "
                              "default blues-01, or the checkpoint's config when resuming")
    deepspeed: str = Field(str(DEFAULT_DS_CONFIG), description="DeepSpeed config JSON")
    max_steps: int = Field(1000, ge=1, description="optimizer steps in all")
    seq_len: int | None = Field(None, ge=1, description=f"tokens per training window (default "
                                f"{DEFAULT_SEQ_LEN}, at most the model's max_seq_len; a resumed run keeps its own)")
    global_batch_tokens: int = Field(524288, ge=1, description="tokens per optimizer step")
    micro_batch: int = Field(0, ge=0, description="sequences per rank per forward; 0 = largest that "
                             "fits (GPU) or <= 8 (CPU)")
    lr: float | None = Field(None, gt=0, allow_inf_nan=False,
                             description="peak learning rate (default: the DeepSpeed config's)")
    lr_schedule_steps: int | None = Field(None, ge=1, description="steps the learning-rate warmup and decay "
                                          "span (default --max_steps); resuming with a larger --max_steps, "
                                          "pass the first run's to keep its schedule")
    eval_interval: int = Field(100, ge=1, description="validate every N steps (and at the end)")
    eval_sequences: int = Field(64, ge=1, description="held-out windows per validation, shared by the "
                                "ranks (rounded up to a multiple of them)")
    save_interval: int = Field(500, ge=1, description="checkpoint every N steps (and at the end)")
    keep_last: int = Field(3, ge=1, description="checkpoints kept")
    resume: str | None = Field(None, description="'auto' (latest complete checkpoint in OUT, if any) "
                               "or a step-N folder")
    resume_into_existing: bool = Field(False, description="with --resume of another run's checkpoint (another "
                                       "mixture or model): continue it in an --out that holds checkpoints of "
                                       "its own, which are moved to checkpoints/abandoned-after-step-N/")
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile each decoder "
                                                  "block; auto = on a GPU only")
    seed: int = Field(0, ge=0, description="loader order and router noise")
    gradient_checkpointing: bool = Field(_OPTIONS.gradient_checkpointing,
                                         description="recompute each block in backward: less memory, more time")
    attn_backend: Literal[ATTN_BACKENDS] = Field(_OPTIONS.attn_backend,
                                                 description="attention kernel; auto = flash_attn when installed")
    loss_chunk_tokens: int = Field(_OPTIONS.loss_chunk_tokens, ge=1,
                                   description="tokens per chunk of the fused head + cross-entropy")
    attention_mask: Literal[ATTENTION_MASKS] = Field(_OPTIONS.attention_mask,
                                                     description="causal = a window is one sequence; document = "
                                                     "attention stops at each <|endoftext|> and positions "
                                                     "restart per document")
    router_balance: Literal[ROUTER_BALANCES] = Field("aux_loss", description="expert balancing: aux_loss = the "
                                                     "model's load-balancing loss; bias = a per-expert routing "
                                                     "bias nudged after each step (no loss; not exportable "
                                                     "to Hugging Face); both")
    router_bias_rate: float = Field(1e-3, gt=0, allow_inf_nan=False,
                                    description="step of the routing bias per optimizer step (--router_balance "
                                    "bias, both)")
    spike_factor: float = Field(1.5, ge=0, allow_inf_nan=False,
                                description="record a step whose loss exceeds this multiple of the running "
                                "median (metrics.jsonl `spike`, with its worst documents); 0 = off")
    spike_window: int = Field(50, ge=1, description="steps in the running median of --spike_factor")
    chunk_cache_dir: str | None = Field(None, description="local folder of chunk copies when the mixture "
                                        "is on object storage (default $BLUES_CACHE_DIR/chunks or "
                                        "~/.cache/blues/chunks)")
    tracking: Literal["auto", "mlflow", "off"] = Field("auto", description="log the run to MLflow "
                                                      "(blues_train/training/tracking.py); auto = when MLFLOW_TRACKING_URI "
                                                      "is set")
    chunk_cache_gb: float = Field(16.0, gt=0, allow_inf_nan=False,
                                  description="disk the chunk copies may take (least recently used go first)")
    index_cache_dir: str | None = Field(None, description="folder of the loader's document tables and pass "
                                        "plans, built once and memory-mapped by every rank (default: MIXTURE/"
                                        ".blues-index, or $BLUES_CACHE_DIR/index for a mixture on object storage)")

    def run_options(self) -> RunOptions:
        return RunOptions(attn_backend=self.attn_backend, gradient_checkpointing=self.gradient_checkpointing,
                          loss_chunk_tokens=self.loss_chunk_tokens, attention_mask=self.attention_mask)

    def aux_loss_coef(self, config: BluesConfig) -> float:
        """The weight of the load-balancing loss in the training loss: none when the bias alone balances."""
        return 0.0 if self.router_balance == "bias" else config.aux_loss_coef

    @property
    def router_bias_step(self) -> float:
        """How far each optimizer step moves the routing bias: 0 when it is not trained."""
        return 0.0 if self.router_balance == "aux_loss" else self.router_bias_rate


def flag_parser(description: str) -> argparse.ArgumentParser:
    """`blues train`'s flags, one per TrainingConfig field; unset flags stay out of the result."""
    parser = argparse.ArgumentParser(prog="blues train", description=description,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--training_config", metavar="FILE.json",
                        help="settings as a JSON object of these flags' names; flags given too win")
    for name, field in TrainingConfig.model_fields.items():
        kind = _flag_type(field.annotation)
        default = "" if field.default is None else f" (default {field.default})"
        if kind is bool:
            parser.add_argument(f"--{name}", action="store_true", help=field.description + default)
        elif isinstance(kind, tuple):
            parser.add_argument(f"--{name}", choices=kind, help=field.description + default)
        else:
            parser.add_argument(f"--{name}", type=kind, help=field.description + default)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return parser


def _flag_type(annotation):
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if isinstance(annotation, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def from_flags(argv: list[str], description: str = "") -> TrainingConfig:
    """The TrainingConfig of a `blues train` command line."""
    given = vars(flag_parser(description).parse_args(argv))
    given.pop("local_rank", None)
    file = given.pop("training_config", None)
    raw = {**(read_json(file, "--training_config") if file else {}), **given}
    config = validated(TrainingConfig, raw, "" if file is None else f"--training_config {file}: ",
                       flags=file is None)
    if config.data_cache_dir is None:
        raise BluesError("--data_cache_dir is required: the mixture folder to train on (blues merge output)")
    return config
