"""What a token teaches: {causal, document} attention x {aux_loss, bias} expert balancing, side by side.

One run, one GPU, same mixture, seeds, steps and tokens for every configuration:
- data: real tokens, the sample corpus (blues_train.data.sample_corpus) prepared and merged as
  `blues prepare` / `blues merge` do, read by the loader `blues train` uses (documents
  packed into seq_len + 1 windows, each ended by <|endoftext|>); the held-out windows are
  the first --eval_windows of the mixture's val split, the same for every configuration;
- model: Blues-01 exactly as `blues train` builds it (BluesLM, compiled blocks on a GPU,
  RunOptions.attention_mask), trained by a plain torch loop instead of DeepSpeed (the GPU
  image has none): bf16 autocast over fp32 weights, fused AdamW with the shipped
  ds_config.json's settings (lr 3e-4, betas 0.9/0.95, weight decay 0.1 on matrices, clip
  1.0), linear warmup over the first 10% of steps then cosine to 10%, the loss
  cross_entropy + aux_loss_coef * aux (0 under bias) + z_loss_coef * z, and under bias
  `BluesLM.nudge_expert_bias` after each step from the step's expert shares, as train.py;
- micro-batch: `blues train`'s layout (train.batch_layout: the largest micro-batch that
  fits, the rest as gradient accumulation) for --batch_tokens per step.
Per configuration and seed: tokens/s and MFU over the steps after --warmup (compile
excluded; MFU per blues_model.flops_per_token against the measured bf16 matmul peak),
held-out cross-entropy scored with each attention mask (`val_ce_document` is what one
document alone sees, as at inference; `val_ce_causal` packed windows attended whole), and
max/mean expert load (routed tokens of the busiest expert over the mean, per MoE layer,
averaged over layers; also the worst layer) on the held-out windows at the end. Also the
throughput of document masking through SDPA with a dense boolean mask, the CPU reference
kernel, against FlexAttention (`dense_document_mask`).

    python benchmarks/learning.py                      # H200 defaults -> benchmarks/results/learning_h200.json
    python benchmarks/learning.py --smoke              # CPU, tiny model: checks the script runs (< 1 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from train_throughput import build_mixture, matmul_peak, release, sync

import blues_model.model
from blues_model import BluesConfig, BluesLM, RunOptions, flops_per_token
from blues_model.attention import document_dense_mask
from blues_train.mixture.loader import PackedSequenceDataset
from blues_train.mixture.spec import read_mixture
from blues_train.training import train
from blues_train.training.config import TrainingConfig

RESULTS = Path(__file__).parent / "results" / "learning_h200.json"
CONFIGS = ("causal:aux_loss", "document:aux_loss", "causal:bias", "document:bias")
ATTENTION_MASKS = ("causal", "document")


@dataclasses.dataclass
class Setup:
    config: BluesConfig
    mixture: Path
    seq_len: int
    batch_tokens: int
    steps: int
    warmup: int
    bias_rate: float
    eval_windows: int
    peak: float | None
    device: torch.device

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def held_out(setup: Setup) -> torch.Tensor:
    val = iter(PackedSequenceDataset(setup.mixture, setup.seq_len, seed=0, split="val"))
    return torch.stack([next(val) for _ in range(setup.eval_windows)])


def build(setup: Setup, mask: str, seed: int):
    torch.manual_seed(seed)
    model = BluesLM(setup.config, RunOptions(attention_mask=mask)).to(setup.device)
    layout = TrainingConfig(global_batch_tokens=setup.batch_tokens, seq_len=setup.seq_len)
    micro, grad_accum = train.batch_layout(layout, 1, model, setup.device)
    if setup.on_gpu:
        model.compile_blocks()
    opt = torch.optim.AdamW(train.param_groups(model), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            fused=setup.on_gpu)
    warm = max(1, setup.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.1 + 0.45 * (
        1 + math.cos(math.pi * min(1.0, max(0, s + 1 - warm) / max(1, setup.steps - warm))))))
    return model, opt, schedule, micro, grad_accum


def train_step(setup: Setup, model, opt, schedule, stream, micro: int, grad_accum: int, balance: str) -> list:
    """One optimizer step as train.py takes it; returns the step's routed tokens per expert,
    per MoE layer (read back every step, as `blues train` does for its record)."""
    c, run = model.config, TrainingConfig(router_balance=balance, router_bias_rate=setup.bias_rate)
    aux_coef = run.aux_loss_coef(c)
    counts = 0
    for _ in range(grad_accum):
        windows = torch.stack([next(stream) for _ in range(micro)]).to(setup.device, non_blocking=True)
        with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=setup.on_gpu):
            out = model(windows[:, :-1], labels=windows[:, 1:])
        ((out.loss + aux_coef * out.aux_loss + c.z_loss_coef * out.z_loss) / grad_accum).backward()
        counts = counts + out.tokens_per_expert
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    schedule.step()
    opt.zero_grad(set_to_none=True)
    counts = counts.tolist()
    if run.router_bias_step:
        model.nudge_expert_bias([[x / sum(layer) for x in layer] for layer in counts], run.router_bias_step)
    return counts


@torch.no_grad()
def evaluate(setup: Setup, model, windows: torch.Tensor, micro: int) -> dict:
    """Held-out cross-entropy under each attention mask, and the expert load of the windows."""
    model.eval()
    trained_with = model.options
    result, counts = {}, 0
    for mask in ATTENTION_MASKS:
        model.options = dataclasses.replace(trained_with, attention_mask=mask)
        total = 0.0
        for s in range(0, len(windows), micro):
            batch = windows[s:s + micro].to(setup.device)
            with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=setup.on_gpu):
                out = model(batch[:, :-1], labels=batch[:, 1:])
            total += out.loss.float().item() * len(batch)
            if mask == trained_with.attention_mask:
                counts = counts + out.tokens_per_expert
        result[f"val_ce_{mask}"] = total / len(windows)
    model.options = trained_with
    model.train()
    load = (counts.float().amax(-1) / counts.float().mean(-1)).tolist()
    return {**result, "max_over_mean_load": sum(load) / len(load), "worst_layer_load": max(load)}


def run_config(setup: Setup, mask: str, balance: str, seed: int, windows: torch.Tensor) -> dict:
    model, opt, schedule, micro, grad_accum = build(setup, mask, seed)
    stream = iter(PackedSequenceDataset(setup.mixture, setup.seq_len, seed=seed, split="train"))
    step_tokens = micro * grad_accum * setup.seq_len
    for _ in range(setup.warmup):
        train_step(setup, model, opt, schedule, stream, micro, grad_accum, balance)
    sync()
    started = time.perf_counter()
    for _ in range(setup.steps - setup.warmup):
        train_step(setup, model, opt, schedule, stream, micro, grad_accum, balance)
    sync()
    tokens_per_s = (setup.steps - setup.warmup) * step_tokens / (time.perf_counter() - started)
    result = {"attention_mask": mask, "router_balance": balance, "seed": seed, "micro_batch": micro,
              "grad_accum": grad_accum, "tokens_per_step": step_tokens, "tokens_per_s": tokens_per_s,
              "mfu": flops_per_token(setup.config, setup.seq_len) * tokens_per_s / setup.peak if setup.peak else None,
              **evaluate(setup, model, windows, micro)}
    del model, opt
    release()
    return result


def dense_mask_throughput(setup: Setup, steps: int) -> dict:
    """Document masking through SDPA with the dense [B, 1, T, T] mask (the CPU reference) on this device."""
    flex_mask = blues_model.model.document_mask
    blues_model.model.document_mask = document_dense_mask
    try:
        short = dataclasses.replace(setup, steps=setup.warmup + steps)
        model, opt, schedule, micro, grad_accum = build(short, "document", 0)
        stream = iter(PackedSequenceDataset(setup.mixture, setup.seq_len, seed=0, split="train"))
        for _ in range(setup.warmup):
            train_step(short, model, opt, schedule, stream, micro, grad_accum, "aux_loss")
        sync()
        started = time.perf_counter()
        for _ in range(steps):
            train_step(short, model, opt, schedule, stream, micro, grad_accum, "aux_loss")
        sync()
        tokens_per_s = steps * micro * grad_accum * setup.seq_len / (time.perf_counter() - started)
        del model, opt
        release()
        return {"tokens_per_s": tokens_per_s, "steps": steps}
    finally:
        blues_model.model.document_mask = flex_mask


def summarize(runs: list[dict]) -> dict:
    """Mean over seeds per configuration."""
    by_config = {}
    for r in runs:
        by_config.setdefault(f"{r['attention_mask']}:{r['router_balance']}", []).append(r)
    keys = ("tokens_per_s", "mfu", "val_ce_document", "val_ce_causal", "max_over_mean_load", "worst_layer_load")
    return {name: {k: (sum(r[k] for r in rs) / len(rs) if rs[0][k] is not None else None) for k in keys}
            | {"seeds": len(rs)} for name, rs in by_config.items()}


def print_table(summary: dict, dense: dict | None) -> None:
    print(f"\n{'configuration':<22}{'tokens/s':>12}{'MFU':>8}{'val CE doc':>12}{'val CE causal':>15}"
          f"{'max/mean load':>15}{'worst layer':>13}")
    for name, r in summary.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        print(f"{name:<22}{r['tokens_per_s']:>12,.0f}{mfu:>8}{r['val_ce_document']:>12.4f}{r['val_ce_causal']:>15.4f}"
              f"{r['max_over_mean_load']:>15.3f}{r['worst_layer_load']:>13.3f}")
    if dense:
        print(f"document masking through SDPA with a dense mask: {dense['tokens_per_s']:,.0f} tokens/s")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, few steps: check the script runs")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per configuration and seed")
    p.add_argument("--warmup", type=int, default=20, help="first steps left out of tokens/s (compilation)")
    p.add_argument("--batch_tokens", type=int, default=65536, help="tokens per optimizer step")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--seeds", type=int, default=1, help="seeds per configuration: --first_seed .. --first_seed + N - 1")
    p.add_argument("--first_seed", type=int, default=0)
    p.add_argument("--configs", default=",".join(CONFIGS), help="MASK:BALANCE pairs, comma separated")
    p.add_argument("--router_bias_rate", type=float, default=TrainingConfig().router_bias_rate)
    p.add_argument("--eval_windows", type=int, default=128, help="held-out windows scored at the end")
    p.add_argument("--dense_steps", type=int, default=20, help="timed steps of the dense-mask SDPA kernel; 0 = skip")
    p.add_argument("--corpus_mb", type=float, default=32.0, help="sample corpus size")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.batch_tokens, args.seq_len = 4, 1, 256, 64
        args.eval_windows, args.dense_steps, args.corpus_mb = 4, 1, 0.5
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.smoke:
        raise SystemExit("no CUDA GPU: run with --smoke to check the script on a CPU")
    configs = [tuple(c.split(":")) for c in args.configs.split(",")]
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": torch.cuda.get_device_name() if on_gpu else "cpu",
               "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
               "torch": torch.__version__, "data": "sample corpus (blues_train.data.sample_corpus), prepared and merged",
               "runs": []}
    peak = matmul_peak(8192, 20) if on_gpu else None
    results["matmul_peak_tflops"] = peak / 1e12 if peak else None
    with tempfile.TemporaryDirectory() as tmp:
        mixture = build_mixture(Path(tmp), args.corpus_mb)
        setup = Setup(config=BluesConfig.preset("tiny" if args.smoke else "blues-01"), mixture=mixture,
                      seq_len=args.seq_len, batch_tokens=args.batch_tokens, steps=args.steps, warmup=args.warmup,
                      bias_rate=args.router_bias_rate, eval_windows=args.eval_windows, peak=peak,
                      device=torch.device("cuda" if on_gpu else "cpu"))
        results["mixture_tokens"] = read_mixture(mixture)["total_tokens"]  # a run of more tokens repeats some
        windows = held_out(setup)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for mask, balance in configs:
                results["runs"].append(run_config(setup, mask, balance, seed, windows))
                print(json.dumps(results["runs"][-1]), flush=True)
                write(results, args.out)  # each configuration kept, should a later one fail
        results["summary"] = summarize(results["runs"])
        results["dense_document_mask"] = dense_mask_throughput(setup, args.dense_steps) if args.dense_steps else None
    print_table(results["summary"], results["dense_document_mask"])
    write(results, args.out)
    print(f"wrote {args.out}")
    return 0


def write(results: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
