"""`blues train`: train a Blues model on a mixture with DeepSpeed (train.py).

One `main`, three ways in:
    blues train --data_cache_dir MIXTURE --out runs/demo --model tiny
    python -m blues_train.training.train --data_cache_dir MIXTURE --out runs/demo
    deepspeed --num_gpus=N --module blues_train.training.train --data_cache_dir MIXTURE ... --deepspeed ds_config.json

The settings are one `TrainingConfig` (blues_train/training/config.py: a flag per field,
or `--training_config FILE.json`). `main` takes the run folder's writer lock; `start` builds
the `Run` (resume point, model, DeepSpeed engine, loaders); `train` loops over
`Run.train_step`, `step_record`, evaluation and `save`.

DeepSpeed owns the optimizer (AdamW), ZeRO, bf16 (on a GPU) and gradient accumulation, as
set in `--deepspeed` (default: the shipped `blues_train/training/ds_config.json`). The batch has one
source of truth, `--global_batch_tokens`: global_batch_tokens / seq_len sequences per
optimizer step = micro_batch x grad_accum x world_size. train.py picks the micro-batch (on a
GPU the largest that fits, by probing) and writes all three numbers into the DeepSpeed
config, which must therefore not set them.

Losses. Each micro-batch's loss is computed on its own tokens:
    loss = cross_entropy + aux_loss_coef * aux_loss + z_loss_coef * z_loss
with the coefficients of the model config. `engine.backward` divides it by grad_accum, and
ZeRO averages the gradients over the ranks, so every optimizer step follows the mean over
all grad_accum x world_size micro-batches of their total loss: the auxiliary terms keep the
same weight against the cross-entropy whatever the accumulation and the number of ranks
(none is summed over ranks, so no x world_size correction is needed). The load-balancing
statistics (share of tokens f_e, mean probability P_e) are those of one micro-batch, not of
the global batch: micro_batch x seq_len tokens per estimate.
Under --router_balance bias the aux_loss_coef is 0: each router's expert bias, nudged after
every step by the step's global expert shares (the same on every rank), balances instead;
checkpoints save it with the weights.

Exact resume. A checkpoint holds the DeepSpeed state (weights, optimizer, scheduler, step)
and the loader's position; the random state (router noise) is re-seeded before every
micro-batch from (seed, step, index of the micro-batch in the global batch). A run resumed
on the same number of ranks therefore repeats the losses of an uninterrupted one, and on
another number of ranks it sees the same windows in the same optimizer steps (the loader's
position is global); with --micro_batch 1 even the micro-batches, and so the losses, agree.

Lineage. Every step record says which global loader windows the step consumed
(`windows`, `layout`; the first record of each start also `data`: mixture, seed, seq_len),
so `blues lineage` maps a step to its documents exactly (blues_train/training/metrics.py documents
the fields). A step whose loss exceeds --spike_factor x the running median of the last
--spike_window steps is a spike: every rank scores its own windows of that step once more,
in eval mode under the weights the step left (those a checkpoint of the step holds), and
rank 0 records the step's worst documents by mean loss in the record's `spike`. That extra
forward changes neither the weights nor the random state of later steps (each micro-batch
reseeds), so the losses are those of a run without spike detection.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from blues_model import BluesConfig, BluesLM, flops_per_token
from blues_train.data import tokenizer
from blues_train.io import storage
from blues_train.io.errors import BluesError
from blues_train.io.folder_lock import exclusive_writer
from blues_train.mixture.loader import PackedSequenceDataset
from blues_train.mixture.spec import read_mixture
from blues_train.training import checkpoint, metrics, tracking
from blues_train.training.config import DEFAULT_SEQ_LEN, TrainingConfig, accelerator_env, free_port, from_flags
from blues_train.training.deepspeed_import import import_deepspeed
from blues_train.training.pipes_bridge import open_reporter
from blues_train.training.remote_run import RemoteRun

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
LR_SCHEDULERS = ("WarmupCosineLR", "WarmupDecayLR")  # those whose length --lr_schedule_steps sets
CPU_MAX_MICRO_BATCH = 8
PROGRESS_SECONDS = 10.0  # inside a longer step, a line this often
CPU_STEP_SECONDS = 10.0  # what the --global_batch_tokens suggested on a CPU aims at
SLOW_CPU_STEP_SECONDS = 60.0  # a CPU step longer than this gets that suggestion
# DeepSpeed's shared-memory all-reduce for CPU ranks of one host, compiled at start (about a minute)
SHM_OP = "deepspeed_shm_comm"
SCHEDULER_NOT_STARTED = "Attempting to get learning rate from scheduler before it has started"
# A test hook: each rank appends every step's windows, as it drew them, to FILE.rank<R> (JSON lines).
WINDOW_DUMP_ENV = "BLUES_WINDOW_DUMP"


def quiet_deepspeed() -> None:
    """Before DeepSpeed is imported: spare the user its messages nobody can act on, its
    accelerator guess (the start line says `on cpu`) and its scheduler's warning about
    DeepSpeed's own constructor reading the learning rate."""
    os.environ.update(accelerator_env())
    deepspeed = import_deepspeed()
    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.utils.logger.addFilter(not_scheduler_warning)


def not_scheduler_warning(record: logging.LogRecord) -> bool:
    return record.getMessage() != SCHEDULER_NOT_STARTED


def prepare_shm_op(world_size: int) -> None:
    """DeepSpeed compiles SHM_OP when CPU ranks start, into a folder every environment of the
    machine shares by default (so two environments rebuild it in turn). One rank has nothing
    to reduce: skip it. Several: build it once per environment, under sys.prefix unless
    TORCH_EXTENSIONS_DIR says where, and say so before the slow part."""
    import deepspeed.ops

    if world_size == 1:
        deepspeed.ops.__compatible_ops__[SHM_OP] = False  # DeepSpeed checks this dict before building
        return
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    build = Path(os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")).expanduser() / SHM_OP
    if is_rank0() and not (build / f"{SHM_OP}.so").exists():
        print(f"building DeepSpeed's shared-memory op for CPU ranks in {build} (once per environment, "
              "about a minute)", flush=True)


def init_distributed() -> tuple[int, int]:
    """Join the DeepSpeed launcher's process group, or make a one-rank group of our own."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        prepare_shm_op(int(os.environ["WORLD_SIZE"]))
    deepspeed.init_distributed()
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def model_config(name: str | None, resume_meta: dict | None) -> BluesConfig:
    """--model as a preset or a JSON file; a resumed run keeps its checkpoint's config."""
    saved = resume_meta and BluesConfig.from_dict(resume_meta["model_config"])
    if name is None:
        return saved or BluesConfig.preset("blues-01")
    try:
        config = BluesConfig.resolve(name)
    except (ValueError, TypeError) as exc:
        raise BluesError(f"--model {name}: {exc}") from None
    if saved and saved != config:
        raise BluesError(f"--model {name} differs from the config of the checkpoint being resumed; "
                         "leave --model out to continue with the checkpoint's config")
    return config


def read_ds_config(path: str) -> dict:
    ds_config = storage.read_json(path, "--deepspeed")
    if not isinstance(ds_config, dict) or not isinstance(ds_config.get("optimizer", {}).get("params"), dict):
        raise BluesError(f"--deepspeed {path}: needs a JSON object with an \"optimizer\" section "
                         "holding \"params\" (see the shipped blues_train/training/ds_config.json)")
    set_keys = [k for k in BATCH_KEYS if k in ds_config]
    if set_keys:
        raise BluesError(f"--deepspeed {path} sets {', '.join(set_keys)}: remove them; the batch "
                         "comes from --global_batch_tokens, --seq_len and --micro_batch")
    fp16 = ds_config.get("fp16")
    if isinstance(fp16, dict) and fp16.get("enabled") and not torch.cuda.is_available():
        raise BluesError(f"--deepspeed {path}: fp16 needs a GPU and this machine has none; remove the "
                         "\"fp16\" section (or set \"enabled\": false)")
    return ds_config


def batch_layout(cfg: TrainingConfig, world_size: int, model, device) -> tuple[int, int]:
    """(micro_batch, grad_accum) for global_batch_tokens / seq_len sequences per step
    (`cfg.seq_len` resolved, see `resolve_seq_len`)."""
    global_batch = cfg.global_batch_tokens // cfg.seq_len
    if global_batch < world_size or global_batch % world_size:
        raise BluesError(f"--global_batch_tokens {cfg.global_batch_tokens} / --seq_len {cfg.seq_len} = "
                         f"{global_batch} sequences per step, which {world_size} ranks cannot share equally")
    per_rank = global_batch // world_size
    if cfg.micro_batch:
        if per_rank % cfg.micro_batch:
            raise BluesError(f"--micro_batch {cfg.micro_batch} does not divide the {per_rank} "
                             "sequences per rank of one step")
        micro = cfg.micro_batch
    elif device.type == "cuda":
        micro = probe_micro_batch(model, cfg.seq_len, per_rank, world_size, device)
    else:
        micro = max(b for b in range(1, min(per_rank, CPU_MAX_MICRO_BATCH) + 1) if per_rank % b == 0)
    return micro, per_rank // micro


def probe_micro_batch(model, seq_len: int, per_rank: int, world_size: int, device) -> int:
    """The largest divisor of `per_rank` whose forward + backward (bf16 autocast, fp32
    weights and grads) leaves room for ZeRO-2's fp32 master weights and Adam moments
    (12 bytes per parameter, split over the ranks), with 10% to spare."""
    n_params = sum(p.numel() for p in model.parameters())
    budget = 0.9 * torch.cuda.get_device_properties(device).total_memory - 12 * n_params / world_size
    model.to(device)
    for micro in sorted((b for b in range(1, per_rank + 1) if per_rank % b == 0), reverse=True):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        ids = torch.zeros(micro, seq_len, dtype=torch.long, device=device)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(ids, labels=ids).loss.backward()
            fits = torch.cuda.max_memory_allocated(device) < budget
        except torch.cuda.OutOfMemoryError:
            fits = False
        model.zero_grad(set_to_none=True)
        if fits:
            return micro
    raise BluesError(f"not even one sequence of --seq_len {seq_len} fits in GPU memory; "
                     "lower --seq_len or pass --gradient_checkpointing")


def param_groups(model) -> list[dict]:
    """AdamW weight decay on matrices only (nanoGPT): not on norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def deepspeed_config(ds_config: dict, cfg: TrainingConfig, micro: int, grad_accum: int, world_size: int,
                     device) -> dict:
    ds_config = json.loads(json.dumps(ds_config))
    ds_config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=grad_accum,
                     train_batch_size=micro * grad_accum * world_size)
    ds_config.setdefault("bf16", {"enabled": device.type == "cuda"})
    optimizer = ds_config.get("optimizer", {}).get("params", {})
    if device.type == "cuda" and optimizer.get("torch_adam"):
        optimizer.setdefault("fused", True)  # one kernel for the whole AdamW update
    if cfg.lr is not None:
        ds_config["optimizer"]["params"]["lr"] = cfg.lr
    scheduler = ds_config.get("scheduler", {})
    if scheduler.get("type") in LR_SCHEDULERS:
        if cfg.lr_schedule_steps:
            scheduler["params"]["total_num_steps"] = cfg.lr_schedule_steps
        scheduler["params"].setdefault("total_num_steps", cfg.max_steps)
        scheduler["params"].setdefault("warmup_num_steps", max(1, (cfg.lr_schedule_steps or cfg.max_steps) // 20))
    return ds_config


def lr_schedule(ds_config: dict) -> dict | None:
    """The steps of the learning-rate schedule (warmup and in all), where --lr_schedule_steps sets them."""
    scheduler = ds_config.get("scheduler", {})
    if scheduler.get("type") not in LR_SCHEDULERS:
        return None
    return {key: scheduler["params"][key] for key in ("warmup_num_steps", "total_num_steps")}


def schedule_change(saved: dict | None, now: dict | None, start_step: int) -> str | None:
    """The warning for a resumed run whose learning-rate schedule is not its checkpoint's
    (a checkpoint from before the schedule was recorded says nothing)."""
    if not saved or not now or saved == now:
        return None
    return (f"warning: the checkpoint's learning-rate schedule spans {saved['total_num_steps']} steps "
            f"(warmup {saved['warmup_num_steps']}), this run's {now['total_num_steps']} (warmup "
            f"{now['warmup_num_steps']}): from step {start_step + 1} the lr follows the new curve; pass "
            f"--lr_schedule_steps {saved['total_num_steps']} to keep the original schedule")


def cpu_cost(micro_seconds: float, grad_accum: int, steps: int, micro_batch_tokens: int) -> str:
    """What a CPU run will cost, from one micro-batch's time (`micro_batch_tokens` over all
    ranks); when a step would take over SLOW_CPU_STEP_SECONDS, a --global_batch_tokens for
    steps of about CPU_STEP_SECONDS."""
    step_seconds = micro_seconds * grad_accum
    line = (f"on cpu one micro-batch took {micro_seconds:.1f}s: about {metrics.duration(step_seconds)} per "
            f"step of {grad_accum} micro-batches, {metrics.duration(step_seconds * steps)} for {steps} steps")
    if step_seconds <= SLOW_CPU_STEP_SECONDS:
        return line
    micro_batches = max(1, int(CPU_STEP_SECONDS / micro_seconds))
    return (f"{line}; for steps of about {metrics.duration(micro_batches * micro_seconds)} pass "
            f"--global_batch_tokens {micro_batches * micro_batch_tokens} (and maybe --model tiny), "
            "or train on a GPU")


def next_batch(stream, micro: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`micro` windows of seq_len + 1 tokens -> (input_ids, labels), each [micro, seq_len]."""
    windows = torch.stack([next(stream) for _ in range(micro)])
    if device.type == "cuda":
        windows = windows.pin_memory().to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]


def global_means(losses, tokens_per_expert, grad_accum: int, world_size: int):
    """All ranks' figures of a step in one all-reduce and one host sync: mean losses over
    every micro-batch of the step, and routed tokens per expert summed."""
    import torch.distributed as dist

    packed = torch.cat([losses.float() / (grad_accum * world_size), tokens_per_expert.flatten().float()])
    dist.all_reduce(packed)
    values = packed.tolist()
    n_experts = tokens_per_expert.shape[1]
    counts = [values[3 + i: 3 + i + n_experts] for i in range(0, len(values) - 3, n_experts)]
    return values[:3], counts


@torch.no_grad()
def evaluate(engine, val_data, val_start: dict, windows: int, micro: int, device) -> float:
    """Mean validation cross-entropy over this rank's share of the same held-out windows
    every time, averaged over ranks (each rank scores `windows` windows)."""
    import torch.distributed as dist

    val_data.load_state_dict(val_start)
    stream = iter(val_data)
    engine.eval()
    total = torch.zeros((), device=device)
    for start in range(0, windows, micro):
        input_ids, labels = next_batch(stream, min(micro, windows - start), device)
        total += engine(input_ids, labels=labels).loss.float() * input_ids.shape[0]
    engine.train()
    total /= windows * dist.get_world_size()
    dist.all_reduce(total)
    return total.item()


@dataclass
class Run:
    """A training run's state: what it trains, where it stands, where it reports."""

    cfg: TrainingConfig  # seq_len resolved
    mixture: dict
    model_config: BluesConfig
    engine: object  # deepspeed.DeepSpeedEngine
    train_data: PackedSequenceDataset
    val_data: PackedSequenceDataset
    rank: int
    world_size: int
    device: torch.device
    micro: int
    grad_accum: int
    start_step: int
    lr_schedule: dict | None = None  # its warmup and total steps (`lr_schedule`), kept in checkpoints
    spike_history: tuple = ()  # the losses before start_step that spike detection continues from
    mirror: RemoteRun | None = None  # a remote --out: where each checkpoint is uploaded (rank 0)
    set_aside: Path | None = None  # where the resume moved the checkpoints it replaces (rank 0)
    tracker: tracking.Off = tracking.Off()  # where rank 0 also logs steps and checkpoints (--tracking)

    def __post_init__(self):
        self.stream = iter(self.train_data)
        self.spikes = metrics.SpikeDetector(self.cfg.spike_factor, self.cfg.spike_window, self.spike_history)
        self.step_batches: list[tuple[torch.Tensor, torch.Tensor]] = []  # this rank's last step
        self.window_dump = os.environ.get(WINDOW_DUMP_ENV)
        self.val_start = self.val_data.state_dict()
        self.tokens_per_step = self.micro * self.grad_accum * self.world_size * self.cfg.seq_len
        self.flops_per_token = flops_per_token(self.model_config, self.cfg.seq_len)
        on_gpu = self.device.type == "cuda"
        self.peak_flops = metrics.peak_flops(torch.cuda.get_device_name(self.device)) if on_gpu else None
        self.last_progress = 0.0  # when rank 0 last said how far the step is

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def train_step(self, step: int):
        """One optimizer step over grad_accum micro-batches. Returns, on the device with no
        host sync, the sums over micro-batches of (cross-entropy, aux, z) and tokens per expert.

        The router noise of each micro-batch is seeded by (seed, step) and the micro-batch's
        index in the global batch, so it repeats on resume, and with one window per
        micro-batch it is the same on any number of ranks (the loader deals windows to
        ranks round-robin)."""
        config, seed = self.model_config, self.cfg.seed * 2**40 + step * 2**16
        started = self.last_progress = time.perf_counter()
        losses = torch.zeros(3, device=self.device)
        tokens_per_expert = 0
        self.step_batches = []
        for micro_step in range(self.grad_accum):
            torch.manual_seed(seed + micro_step * self.world_size + self.rank)
            input_ids, labels = next_batch(self.stream, self.micro, self.device)
            self.step_batches.append((input_ids, labels))  # kept for a spike's document losses
            out = self.engine(input_ids, labels=labels)
            loss = out.loss + self.cfg.aux_loss_coef(config) * out.aux_loss + config.z_loss_coef * out.z_loss
            self.engine.backward(loss)  # scales by 1 / grad_accum; gradients are averaged over ranks
            self.engine.step()  # the optimizer steps only after the last micro-batch
            losses += torch.stack([out.loss, out.aux_loss, out.z_loss]).detach()
            tokens_per_expert = tokens_per_expert + out.tokens_per_expert
            if self.rank == 0:
                self.report_micro_batch(step, micro_step + 1, started)
        if self.window_dump:
            self.dump_windows(step)
        return losses, tokens_per_expert

    def balance_experts(self, record: dict) -> None:
        """--router_balance bias/both: nudge each router's bias by the step's expert shares (all ranks')."""
        if self.cfg.router_bias_step:
            shares = [layer["share"] for layer in record["experts"]]
            self.engine.module.nudge_expert_bias(shares, self.cfg.router_bias_step)

    def report_micro_batch(self, step: int, done: int, started: float) -> None:
        """Rank 0, after each micro-batch: on a CPU, what the run will cost, from the first
        micro-batch of this start; inside a long step, a line every PROGRESS_SECONDS."""
        now = time.perf_counter()
        if self.device.type == "cpu" and step == self.start_step + 1 and done == 1:
            print(cpu_cost(now - started, self.grad_accum, self.cfg.max_steps - self.start_step,
                           self.micro * self.world_size * self.cfg.seq_len), flush=True)
        if done < self.grad_accum and now - self.last_progress >= PROGRESS_SECONDS:
            print(f"step {step}/{self.cfg.max_steps}: micro-batch {done}/{self.grad_accum} "
                  f"({metrics.duration(now - started)} into the step)", flush=True)
            self.last_progress = now

    def dump_windows(self, step: int) -> None:
        windows = [torch.cat([x, y[:, -1:]], dim=1) for x, y in self.step_batches]
        line = {"step": step, "rank": self.rank, "windows": torch.cat(windows).tolist()}
        with open(f"{self.window_dump}.rank{self.rank}", "a") as fh:
            fh.write(json.dumps(line) + "\n")

    def step_token_losses(self) -> torch.Tensor:
        """[windows of this rank in the last step, seq_len]: each label's cross-entropy under
        the current weights, in eval mode (no router noise), in the order the rank drew them."""
        self.engine.eval()
        try:
            return torch.cat([metrics.token_losses(self.engine.module, x, y) for x, y in self.step_batches])
        finally:
            self.engine.train()

    def data_identity(self) -> dict:
        """What the global window numbers of this run are numbers of."""
        return {"mixture": storage.display(self.cfg.data_cache_dir),
                "mixture_fingerprint": self.mixture["fingerprint"], "seed": self.cfg.seed,
                "seq_len": self.cfg.seq_len}

    def evaluate(self) -> float:
        windows = -(-self.cfg.eval_sequences // self.world_size)
        return evaluate(self.engine, self.val_data, self.val_start, windows, self.micro, self.device)

    def checkpoint_meta(self, step: int, record: dict) -> dict:
        import deepspeed

        return {"step": step, "loss": record["loss"], "val_loss": record.get("val_loss"),
                "world_size": self.world_size, "micro_batch": self.micro, "grad_accum": self.grad_accum,
                "seq_len": self.cfg.seq_len, "tokens": step * self.tokens_per_step,
                "attention_mask": self.cfg.attention_mask, "router_balance": self.cfg.router_balance,
                "loader": self.train_data.state_dict(), "seed": self.cfg.seed,
                "spike_history": list(self.spikes.history), "lr_schedule": self.lr_schedule,
                "mixture": {"path": storage.display(self.cfg.data_cache_dir),
                            "fingerprint": self.mixture["fingerprint"]},
                "model_config": self.model_config.to_dict(), "code_version": checkpoint.code_version(),
                "torch": torch.__version__, "deepspeed": deepspeed.__version__}


def main(argv=None) -> int:
    cfg = from_flags(sys.argv[1:] if argv is None else argv, __doc__.split("\n")[0])
    if storage.is_remote(cfg.out):
        return train_remote(cfg)
    if not is_rank0():  # the other ranks write only what rank 0 waits for
        return train(cfg)
    with exclusive_writer(cfg.out):
        return train(cfg)


def train_remote(cfg: TrainingConfig) -> int:
    """--out on object storage: train in a local staging folder; rank 0, holding the folder's
    lease, stages it (pulls what --resume needs) and uploads every checkpoint (remote_run)."""
    mirror = RemoteRun(cfg.out)
    storage.check_output_folder(cfg.out, "--out")
    local = cfg.model_copy(update={"out": str(mirror.local), "resume": mirror.local_resume(cfg.resume)})
    if not is_rank0():
        mirror.wait_staged()
        return train(local)
    with exclusive_writer(cfg.out):
        mirror.stage(cfg.resume, cfg.resume_into_existing)
        return train(local, mirror)


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def train(cfg: TrainingConfig, mirror: RemoteRun | None = None) -> int:
    run = start(cfg)
    run.mirror = mirror
    run.tracker = tracking.tracker(run.cfg, run.mixture, run.start_step, run.rank)
    with run.tracker.ending():
        train_steps(run)
    if mirror is not None:
        mirror.push_logs()
    return 0


def train_steps(run: Run) -> None:
    """The steps from run.start_step to max_steps: rank 0 logs, reports and tracks them."""
    cfg = run.cfg  # with seq_len resolved
    log = None
    if run.rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        if run.set_aside:
            metrics.keep_copy(run.out, run.set_aside)
        metrics.keep_until(run.out, run.start_step)
        log = metrics.MetricsLog(run.out, run.start_step, cfg.max_steps)
        print(f"training {'resumed at step ' + str(run.start_step) if run.start_step else 'from scratch'}: "
              f"{run.world_size} rank(s) x micro-batch {run.micro} x grad_accum {run.grad_accum} x seq_len "
              f"{cfg.seq_len} = {run.tokens_per_step} tokens per step, on {run.device.type}", flush=True)
    with open_reporter(run.rank) as reporter:
        record, last_saved = {}, run.start_step
        clock = time.perf_counter()
        for step in range(run.start_step + 1, cfg.max_steps + 1):
            record = step_record(run, step, *run.train_step(step), started=clock)
            run.balance_experts(record)  # before anything scores or saves the step's weights
            if step == run.start_step + 1:
                record["data"] = run.data_identity()
            median = run.spikes.observe(record["loss"])  # the same on every rank: the loss is all-reduced
            if median is not None:
                spike = spike_record(run, record, median)
                if spike:
                    record["spike"] = spike
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                record["val_loss"] = run.evaluate()
                record["val_perplexity"] = math.exp(record["val_loss"])
            if log:
                line = log.write(record)
                run.tracker.log_step(record)
                reporter.log(line)
            if step % cfg.save_interval == 0 or step == cfg.max_steps:
                save(run, step, record, reporter)
                last_saved = step
            clock = time.perf_counter()
        if record:
            reporter.finish({"final_loss": record["loss"], "final_val_loss": record.get("val_loss"),
                             "steps": cfg.max_steps, "last_checkpoint": last_saved})
    if log:
        log.close()


def start(cfg: TrainingConfig) -> Run:
    """Everything before the first step: what to resume, the loaders, the model, DeepSpeed."""
    quiet_deepspeed()
    import deepspeed

    mixture = read_mixture(cfg.data_cache_dir)
    checkpoints = Path(cfg.out) / "checkpoints"
    resume_from = checkpoint.resolve_resume(cfg.resume, checkpoints)
    if resume_from and is_rank0():
        checkpoint.verify_files(resume_from)  # before anything of it is read
    resume_meta = checkpoint.read_meta(resume_from) if resume_from else None
    if resume_meta and resume_meta["mixture"]["fingerprint"] != mixture["fingerprint"]:
        raise BluesError(f"--resume {resume_from} was trained on mixture {resume_meta['mixture']['fingerprint'][:16]}, "
                         f"--data_cache_dir {cfg.data_cache_dir} is {mixture['fingerprint'][:16]}: "
                         "resume with the same mixture or start a new --out")
    config = model_config(cfg.model, resume_meta)
    cfg = cfg.model_copy(update={"seq_len": resolve_seq_len(cfg, config, resume_meta)})
    if config.vocab_size < tokenizer.N_VOCAB:
        raise BluesError(f"--model: vocab_size {config.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.N_VOCAB} ids ({tokenizer.NAME})")
    ds_config = read_ds_config(cfg.deepspeed)
    set_aside = checkpoint.check_start(checkpoints, resume_from, set_aside=is_rank0(),  # once all else agrees
                                       into_existing=cfg.resume_into_existing)

    rank, world_size = init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    # The loaders first: a store that cannot be read fails before a large model is built.
    loaders = [PackedSequenceDataset(cfg.data_cache_dir, cfg.seq_len, seed=cfg.seed, rank=rank,
                                     world_size=world_size, split=split, chunk_cache_dir=cfg.chunk_cache_dir,
                                     chunk_cache_bytes=int(cfg.chunk_cache_gb * 2**30),
                                     index_cache_dir=cfg.index_cache_dir)
               for split in ("train", "val")]
    torch.manual_seed(cfg.seed)
    model = BluesLM(config, cfg.run_options())
    micro, grad_accum = batch_layout(cfg, world_size, model, device)
    if cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"):
        model.compile_blocks()
    ds_config = deepspeed_config(ds_config, cfg, micro, grad_accum, world_size, device)
    schedule = lr_schedule(ds_config)
    warning = resume_meta and schedule_change(resume_meta.get("lr_schedule"), schedule, resume_meta["step"])
    if warning and rank == 0:
        print(warning, flush=True)
    if resume_from:
        load_dir, universal = checkpoint.deepspeed_load_dir(resume_from, world_size)
        if universal:
            ds_config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds_config)
    if resume_from:
        checkpoint.load(engine, load_dir)
        loaders[0].load_state_dict(resume_meta["loader"])
    return Run(cfg=cfg, mixture=mixture, model_config=config, engine=engine, train_data=loaders[0],
               val_data=loaders[1], rank=rank, world_size=world_size, device=device, micro=micro,
               grad_accum=grad_accum, start_step=resume_meta["step"] if resume_meta else 0, lr_schedule=schedule,
               spike_history=tuple(resume_meta.get("spike_history", ())) if resume_meta else (),
               set_aside=set_aside)


def resolve_seq_len(cfg: TrainingConfig, config: BluesConfig, resume_meta: dict | None) -> int:
    """--seq_len, else the resumed run's, else the default capped by the model's max_seq_len."""
    seq_len = cfg.seq_len or (resume_meta["seq_len"] if resume_meta else min(DEFAULT_SEQ_LEN, config.max_seq_len))
    if seq_len > config.max_seq_len:
        raise BluesError(f"--seq_len {seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    return seq_len


def step_record(run: Run, step: int, losses, tokens_per_expert, started: float) -> dict:
    """The step's figures, all ranks' together (one all-reduce, one host sync); its time
    runs from `started` to that sync."""
    (loss, aux, z), counts = global_means(losses, tokens_per_expert, run.grad_accum, run.world_size)
    seconds = time.perf_counter() - started
    end = run.train_data.windows_consumed()
    record = {"step": step, "time": round(time.time(), 3), "loss": loss, "aux_loss": aux, "z_loss": z,
              "lr": run.engine.get_lr()[0], "grad_norm": float(run.engine.get_global_grad_norm()),
              "tokens": step * run.tokens_per_step, "tokens_per_s": run.tokens_per_step / seconds,
              "experts": metrics.expert_utilization(counts, run.model_config.moe_layers),
              "windows": [end - run.micro * run.grad_accum * run.world_size, end],
              "layout": {"world_size": run.world_size, "micro_batch": run.micro, "grad_accum": run.grad_accum}}
    if run.peak_flops:
        record["mfu"] = run.flops_per_token * record["tokens_per_s"] / (run.peak_flops * run.world_size)
    return record


def spike_record(run: Run, record: dict, median: float) -> dict | None:
    """A spike step's `spike` entry (metrics.py): every rank scores its windows of the step
    (`Run.step_token_losses`), rank 0 gathers the losses, maps the windows to their documents
    (the loader's plan; only the chunks involved are read) and keeps the worst documents.
    All ranks call it; rank 0 returns the entry, the others None."""
    import torch.distributed as dist

    losses = run.step_token_losses().contiguous()
    gathered = [torch.empty_like(losses) for _ in range(run.world_size)]
    dist.all_gather(gathered, losses)
    if run.rank != 0:
        return None
    by_rank = [g.float().cpu() for g in gathered]
    first, end = record["windows"]
    windows = [(run.train_data.window_pieces(g), by_rank[(g - first) % run.world_size][(g - first) // run.world_size])
               for g in range(first, end)]
    worst = metrics.document_losses(windows)[:metrics.SPIKE_DOCUMENTS]
    names = run.train_data.document_ids([d["document"] for d in worst])
    return {"median": median, "ratio": record["loss"] / median, "factor": run.cfg.spike_factor,
            "steps": run.spikes.median_of,
            "documents": [{**name.to_dict(), "tokens": d["tokens"], "mean_loss": d["mean_loss"],
                           "max_loss": d["max_loss"]} for name, d in zip(names, worst)]}


def save(run: Run, step: int, record: dict, reporter) -> None:
    """Checkpoint step `step` (all ranks); rank 0 reports it."""
    config = run.model_config.to_dict()
    saved = checkpoint.save(run.engine, run.out / "checkpoints", step, config=config,
                            meta=run.checkpoint_meta(step, record), keep_last=run.cfg.keep_last)
    if saved:
        print(f"checkpoint {saved}", flush=True)
        run.tracker.log_checkpoint(saved, checkpoint.read_meta(saved)["files"][checkpoint.MODEL_FILE])
        if run.mirror is not None:  # uploaded after the local atomic save, meta.json last
            run.mirror.push_checkpoint(saved, run.cfg.keep_last)
            print(f"uploaded {run.mirror.checkpoints / saved.name}", flush=True)
        reporter.checkpoint(run.mirror.checkpoints / saved.name if run.mirror else saved, step=step,
                            loss=record["loss"], val_loss=record.get("val_loss"),
                            mixture_fingerprint=run.mixture["fingerprint"],
                            weights_sha256=checkpoint.read_meta(saved)["files"][checkpoint.MODEL_FILE])


if __name__ == "__main__":
    from blues_train.io.command_line import run_command

    sys.exit(run_command(main, sys.argv[1:]))
