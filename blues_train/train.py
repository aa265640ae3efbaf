"""`blues train`: train a Blues model on a mixture with DeepSpeed (train.py).

One `main`, three ways in:
    blues train --data_cache_dir MIXTURE --out runs/demo --model tiny
    python -m blues_train.train --data_cache_dir MIXTURE --out runs/demo
    deepspeed --num_gpus=N --module blues_train.train --data_cache_dir MIXTURE ... --deepspeed ds_config.json

DeepSpeed owns the optimizer (AdamW), ZeRO, bf16 (on a GPU) and gradient accumulation, as
set in `--deepspeed` (default: the shipped `blues_train/ds_config.json`). The batch has one
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

Exact resume. A checkpoint holds the DeepSpeed state (weights, optimizer, scheduler, step)
and the loader's position; the random state (router noise) is re-seeded before every
micro-batch from (seed, step, index of the micro-batch in the global batch). A run resumed
on the same number of ranks therefore repeats the losses of an uninterrupted one, and on
another number of ranks it sees the same windows in the same optimizer steps (the loader's
position is global); with --micro_batch 1 even the micro-batches, and so the losses, agree.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from blues_model import BluesConfig, BluesLM, flops_per_token
from blues_train import checkpoint, metrics, tokenizer
from blues_train.errors import BluesError
from blues_train.folder_lock import exclusive_writer
from blues_train.loader import PackedSequenceDataset
from blues_train.mixture import read_mixture
from blues_train.pipes_bridge import open_reporter

DEFAULT_DS_CONFIG = Path(__file__).with_name("ds_config.json")
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
CPU_MAX_MICRO_BATCH = 8
DEFAULT_SEQ_LEN = 1024


def parse_args(argv):
    p = argparse.ArgumentParser(prog="blues train", description=__doc__.split("\n")[0])
    p.add_argument("--data_cache_dir", required=True, help="mixture folder (blues merge output)")
    p.add_argument("--out", default="runs/blues", help="run folder: metrics.jsonl, tensorboard/, checkpoints/")
    p.add_argument("--model", default=None,
                   help="preset (blues-01, tiny) or a BluesConfig JSON file; default blues-01, "
                        "or the checkpoint's config when resuming")
    p.add_argument("--deepspeed", default=str(DEFAULT_DS_CONFIG), help="DeepSpeed config JSON")
    p.add_argument("--max_steps", type=int, default=1000, help="optimizer steps in all")
    p.add_argument("--seq_len", type=int, default=None,
                   help=f"tokens per training window (default {DEFAULT_SEQ_LEN}, at most the model's "
                        "max_seq_len; a resumed run keeps its own)")
    p.add_argument("--global_batch_tokens", type=int, default=524288, help="tokens per optimizer step")
    p.add_argument("--micro_batch", type=int, default=0,
                   help="sequences per rank per forward; 0 = largest that fits (GPU) or <= 8 (CPU)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the DeepSpeed config's)")
    p.add_argument("--eval_interval", type=int, default=100, help="validate every N steps (and at the end)")
    p.add_argument("--eval_sequences", type=int, default=64,
                   help="held-out windows per validation, shared by the ranks (rounded up to a multiple of them)")
    p.add_argument("--save_interval", type=int, default=500, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep_last", type=int, default=3, help="checkpoints kept")
    p.add_argument("--resume", default=None, help="'auto' (latest complete checkpoint in OUT, if any) or a step-N folder")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile each decoder block; auto = on a GPU only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args(argv)
    for flag in ("max_steps", "seq_len", "global_batch_tokens", "eval_interval", "eval_sequences",
                 "save_interval", "keep_last"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise BluesError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    return args


def init_distributed() -> tuple[int, int]:
    """Join the DeepSpeed launcher's process group, or make a one-rank group of our own."""
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed()
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def model_config(name: str | None, resume_meta: dict | None) -> BluesConfig:
    """--model as a preset or a JSON file; a resumed run keeps its checkpoint's config."""
    saved = resume_meta and BluesConfig.from_dict(resume_meta["model_config"])
    if name is None:
        return saved or BluesConfig.preset("blues-01")
    try:
        if name.endswith(".json"):
            config = BluesConfig.from_dict(json.loads(Path(name).read_text()))
        else:
            config = BluesConfig.preset(name)
    except (OSError, ValueError, TypeError) as exc:
        raise BluesError(f"--model {name}: {exc}") from None
    if saved and saved != config:
        raise BluesError(f"--model {name} differs from the config of the checkpoint being resumed; "
                         "leave --model out to continue with the checkpoint's config")
    return config


def read_ds_config(path: str) -> dict:
    try:
        ds_config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BluesError(f"--deepspeed {path}: cannot read a JSON config ({exc})") from None
    if not isinstance(ds_config, dict) or not isinstance(ds_config.get("optimizer", {}).get("params"), dict):
        raise BluesError(f"--deepspeed {path}: needs a JSON object with an \"optimizer\" section "
                         "holding \"params\" (see the shipped blues_train/ds_config.json)")
    set_keys = [k for k in BATCH_KEYS if k in ds_config]
    if set_keys:
        raise BluesError(f"--deepspeed {path} sets {', '.join(set_keys)}: remove them; the batch "
                         "comes from --global_batch_tokens, --seq_len and --micro_batch")
    return ds_config


def batch_layout(args, world_size: int, model, device) -> tuple[int, int]:
    """(micro_batch, grad_accum) for global_batch_tokens / seq_len sequences per step."""
    global_batch = args.global_batch_tokens // args.seq_len
    if global_batch < world_size or global_batch % world_size:
        raise BluesError(f"--global_batch_tokens {args.global_batch_tokens} / --seq_len {args.seq_len} = "
                         f"{global_batch} sequences per step, which {world_size} ranks cannot share equally")
    per_rank = global_batch // world_size
    if args.micro_batch:
        if per_rank % args.micro_batch:
            raise BluesError(f"--micro_batch {args.micro_batch} does not divide the {per_rank} "
                             "sequences per rank of one step")
        micro = args.micro_batch
    elif device.type == "cuda":
        micro = probe_micro_batch(model, args.seq_len, per_rank, world_size, device)
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
                     "lower --seq_len or set gradient_checkpointing in the --model config")


def param_groups(model) -> list[dict]:
    """AdamW weight decay on matrices only (nanoGPT): not on norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def deepspeed_config(ds_config: dict, args, micro: int, grad_accum: int, world_size: int, device) -> dict:
    ds_config = json.loads(json.dumps(ds_config))
    ds_config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=grad_accum,
                     train_batch_size=micro * grad_accum * world_size)
    ds_config.setdefault("bf16", {"enabled": device.type == "cuda"})
    optimizer = ds_config.get("optimizer", {}).get("params", {})
    if device.type == "cuda" and optimizer.get("torch_adam"):
        optimizer.setdefault("fused", True)  # one kernel for the whole AdamW update
    if args.lr is not None:
        ds_config["optimizer"]["params"]["lr"] = args.lr
    scheduler = ds_config.get("scheduler", {})
    if scheduler.get("type") in ("WarmupCosineLR", "WarmupDecayLR"):
        scheduler["params"].setdefault("total_num_steps", args.max_steps)
        scheduler["params"].setdefault("warmup_num_steps", max(1, args.max_steps // 20))
    return ds_config


def next_batch(stream, micro: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`micro` windows of seq_len + 1 tokens -> (input_ids, labels), each [micro, seq_len]."""
    windows = torch.stack([next(stream) for _ in range(micro)])
    if device.type == "cuda":
        windows = windows.pin_memory().to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]


def train_step(engine, stream, config: BluesConfig, micro: int, grad_accum: int, seed: int,
               rank: int, world_size: int, device):
    """One optimizer step over grad_accum micro-batches. Returns, on the device with no host
    sync, the sums over micro-batches of (cross-entropy, aux, z) and tokens per expert.

    The router noise of each micro-batch is seeded by `seed` and the micro-batch's index in
    the global batch, so it repeats on resume, and with one window per micro-batch it is
    the same on any number of ranks (the loader deals windows to ranks round-robin)."""
    losses = torch.zeros(3, device=device)
    tokens_per_expert = 0
    for micro_step in range(grad_accum):
        torch.manual_seed(seed + micro_step * world_size + rank)
        input_ids, labels = next_batch(stream, micro, device)
        out = engine(input_ids, labels=labels)
        loss = out.loss + config.aux_loss_coef * out.aux_loss + config.z_loss_coef * out.z_loss
        engine.backward(loss)  # scales by 1 / grad_accum; gradients are averaged over ranks
        engine.step()  # the optimizer steps only after the last micro-batch
        losses += torch.stack([out.loss, out.aux_loss, out.z_loss]).detach()
        tokens_per_expert = tokens_per_expert + out.tokens_per_expert
    return losses, tokens_per_expert


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


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with ExitStack() as stack:
        if os.environ.get("RANK", "0") == "0":  # the other ranks write only what rank 0 waits for
            stack.enter_context(exclusive_writer(args.out))
        return train(args)


def train(args) -> int:
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    mixture = read_mixture(args.data_cache_dir)
    out = Path(args.out)
    checkpoints = out / "checkpoints"
    is_rank0 = os.environ.get("RANK", "0") == "0"
    resume_from = checkpoint.resolve_resume(args.resume, checkpoints)
    if resume_from and is_rank0:
        checkpoint.verify_files(resume_from)  # before anything of it is read
    checkpoint.check_start(checkpoints, resume_from, set_aside=is_rank0)
    resume_meta = checkpoint.read_meta(resume_from) if resume_from else None
    if resume_meta and resume_meta["mixture"]["fingerprint"] != mixture["fingerprint"]:
        raise BluesError(f"--resume {resume_from} was trained on mixture {resume_meta['mixture']['fingerprint'][:16]}, "
                         f"--data_cache_dir {args.data_cache_dir} is {mixture['fingerprint'][:16]}: "
                         "resume with the same mixture or start a new --out")
    config = model_config(args.model, resume_meta)
    if args.seq_len is None:
        args.seq_len = resume_meta["seq_len"] if resume_meta else min(DEFAULT_SEQ_LEN, config.max_seq_len)
    if config.vocab_size < tokenizer.N_VOCAB:
        raise BluesError(f"--model: vocab_size {config.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.N_VOCAB} ids ({tokenizer.NAME})")
    if args.seq_len > config.max_seq_len:
        raise BluesError(f"--seq_len {args.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    ds_config = read_ds_config(args.deepspeed)

    rank, world_size = init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(args.seed)
    model = BluesLM(config)
    micro, grad_accum = batch_layout(args, world_size, model, device)
    if args.compile == "on" or (args.compile == "auto" and device.type == "cuda"):
        model.compile_blocks()
    ds_config = deepspeed_config(ds_config, args, micro, grad_accum, world_size, device)
    if resume_from:
        load_dir, universal = checkpoint.deepspeed_load_dir(resume_from, world_size)
        if universal:
            ds_config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds_config)

    train_data = PackedSequenceDataset(args.data_cache_dir, args.seq_len, seed=args.seed, rank=rank,
                                       world_size=world_size, split="train")
    val_data = PackedSequenceDataset(args.data_cache_dir, args.seq_len, seed=args.seed, rank=rank,
                                     world_size=world_size, split="val")
    val_start = val_data.state_dict()
    start_step = 0
    if resume_from:
        checkpoint.load(engine, load_dir)
        train_data.load_state_dict(resume_meta["loader"])
        start_step = resume_meta["step"]
    stream = iter(train_data)

    eval_windows = -(-args.eval_sequences // world_size)
    tokens_per_step = micro * grad_accum * world_size * args.seq_len
    flops = flops_per_token(config, args.seq_len)
    peak = metrics.peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    log = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        metrics.keep_until(out, start_step)
        log = metrics.MetricsLog(out, start_step)
        print(f"training {'resumed at step ' + str(start_step) if start_step else 'from scratch'}: "
              f"{world_size} rank(s) x micro-batch {micro} x grad_accum {grad_accum} x seq_len "
              f"{args.seq_len} = {tokens_per_step} tokens per step, on {device.type}", flush=True)

    record, last_saved = {}, start_step
    with open_reporter(rank) as reporter:
        clock = time.perf_counter()
        for step in range(start_step + 1, args.max_steps + 1):
            seed = args.seed * 2**40 + step * 2**16
            losses, tokens_per_expert = train_step(engine, stream, config, micro, grad_accum, seed,
                                                   rank, world_size, device)
            (loss, aux, z), counts = global_means(losses, tokens_per_expert, grad_accum, world_size)
            now = time.perf_counter()
            record = {"step": step, "loss": loss, "aux_loss": aux, "z_loss": z,
                      "lr": engine.get_lr()[0], "grad_norm": float(engine.get_global_grad_norm()),
                      "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_step / (now - clock),
                      "experts": metrics.expert_utilization(counts, config.moe_layers)}
            if peak:
                record["mfu"] = flops * record["tokens_per_s"] / (peak * world_size)
            if step % args.eval_interval == 0 or step == args.max_steps:
                record["val_loss"] = evaluate(engine, val_data, val_start, eval_windows, micro, device)
                record["val_perplexity"] = math.exp(record["val_loss"])
            if log:
                log.write(record)
                reporter.log(metrics.format_line(record))
            if step % args.save_interval == 0 or step == args.max_steps:
                meta = {"step": step, "loss": loss, "val_loss": record.get("val_loss"),
                        "world_size": world_size, "micro_batch": micro, "grad_accum": grad_accum,
                        "seq_len": args.seq_len, "tokens": step * tokens_per_step,
                        "loader": train_data.state_dict(), "seed": args.seed,
                        "mixture": {"path": str(Path(args.data_cache_dir).resolve()),
                                    "fingerprint": mixture["fingerprint"]},
                        "model_config": config.to_dict(), "code_version": checkpoint.code_version(),
                        "torch": torch.__version__, "deepspeed": deepspeed.__version__}
                saved = checkpoint.save(engine, checkpoints, step, config=config.to_dict(), meta=meta,
                                        keep_last=args.keep_last)
                last_saved = step
                if saved:
                    print(f"checkpoint {saved}", flush=True)
                    reporter.checkpoint(saved, step=step, loss=loss, val_loss=record.get("val_loss"),
                                        mixture_fingerprint=mixture["fingerprint"])
            clock = time.perf_counter()
        if record:
            reporter.finish({"final_loss": record["loss"], "final_val_loss": record.get("val_loss"),
                             "steps": args.max_steps, "last_checkpoint": last_saved})
    if log:
        log.close()
    return 0


if __name__ == "__main__":
    from blues_train.cli import run_command

    sys.exit(run_command(main, sys.argv[1:]))
