"""Blues-01 training and decoding speed on one GPU, side by side with HF Mixtral.

One run, one GPU:
1. the bf16 matmul peak (8192^3, random data): the MFU denominator;
2. Blues-01 training steps through `blues train`'s own code path (DeepSpeed engine from
   the shipped ds_config.json, bf16, ZeRO-2, compiled blocks, seq 2048) on real tokens from
   the sample corpus (prepare -> merge -> PackedSequenceDataset): tokens/s, MFU (per
   `blues_model.flops_per_token`: 6 x active matmul parameters + the attention term),
   peak memory;
3. the same for Blues with every layer MoE and for HF `MixtralForCausalLM` at that matched
   shape (d 768, 12 layers all MoE, 12 heads, 1 KV head, 8 experts top-2, SwiGLU 2048,
   vocab 200064, tied embeddings; bf16 autocast, fused AdamW, SDPA), if transformers imports;
4. decoding with the KV cache at batch 1 and 32 against HF `generate`;
5. loss parity: 20 steps of the fast path (bf16 + compile) against the plain path (fp32,
   eager), same init, same data, same router noise;
then prints a table and writes benchmarks/results/train_throughput_h200.json.

    python benchmarks/train_throughput.py               # on the GPU machine
    python benchmarks/train_throughput.py --smoke       # CPU, tiny model: checks the script runs
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from blues_model import BluesConfig, BluesLM, flops_per_token
from blues_model.generation import generate
from blues_train.data.prepare import prepare_dataset
from blues_train.data.sample_corpus import write_sample_corpus
from blues_train.mixture.loader import PackedSequenceDataset
from blues_train.mixture.merge import merge
from blues_train.mixture.spec import read_mixture
from blues_train.training import train
from blues_train.training.config import TrainingConfig

RESULTS = Path(__file__).parent / "results" / "train_throughput_h200.json"
# DeepSpeed settings measured against the shipped ds_config.json, Blues-01 at micro-batch 8.
LEVERS = {
    "adamw_foreach_not_fused": {"optimizer": {"params": {"fused": False}}},
    "no_overlap_comm": {"zero_optimization": {"overlap_comm": False}},
    "zero_stage_1": {"zero_optimization": {"stage": 1}},
    "zero_stage_0_bf16_optimizer": {"zero_optimization": {"stage": 0}},
    "torch_autocast_fp32_weights": {"bf16": {"enabled": False},
                                    "torch_autocast": {"enabled": True, "dtype": "bfloat16"}},
}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak(n: int, iters: int) -> float:
    """bf16 FLOP/s of an n^3 matmul on random data, median of `iters` timed products."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / sorted(times)[len(times) // 2]


def build_mixture(work: Path, max_mb: float) -> Path:
    corpus = write_sample_corpus(work / "corpus", max_mb=max_mb)
    stores = []
    for name, inputs in corpus.items():
        prepare_dataset(inputs, work / name, progress=False)
        stores.append(work / name)
    merge(stores, work / "mixture", strategy="equal")
    return work / "mixture"


def blues_engine(config: BluesConfig, micro: int, grad_accum: int, compile_blocks: bool, bf16: bool,
                 overrides: dict | None = None):
    """A DeepSpeed engine exactly as `blues train` builds it (shipped ds_config.json), with
    optional `overrides` merged into its top-level sections (the levers measured)."""
    import deepspeed

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    defaults = TrainingConfig()
    ds_config = train.deepspeed_config(train.read_ds_config(defaults.deepspeed), defaults, micro,
                                       grad_accum, 1, device)
    ds_config["bf16"] = {"enabled": bf16}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(ds_config.get(key), dict):
            ds_config[key] = {**ds_config[key], **value}
        else:
            ds_config[key] = value
    if "params" in (overrides or {}).get("optimizer", {}):
        ds_config["optimizer"]["params"] = {**train.read_ds_config(defaults.deepspeed)["optimizer"]["params"],
                                            **overrides["optimizer"]["params"]}
    model = BluesLM(config)
    if compile_blocks:
        model.compile_blocks()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=train.param_groups(model), config=ds_config)
    return engine


def blues_run(engine, mixture, config: BluesConfig, seq_len: int, micro: int, grad_accum: int = 1) -> train.Run:
    """The state `blues train` steps with, around `engine`: one rank, loader seed 0."""
    loaders = [PackedSequenceDataset(mixture, seq_len, seed=0, split=split) for split in ("train", "val")]
    return train.Run(cfg=TrainingConfig(data_cache_dir=str(mixture), seq_len=seq_len), mixture=read_mixture(mixture),
                     model_config=config, engine=engine, train_data=loaders[0], val_data=loaders[1], rank=0,
                     world_size=1, device=torch.device(engine.device), micro=micro, grad_accum=grad_accum,
                     start_step=0)


def run_steps(run: train.Run, first: int, steps: int) -> list[float]:
    """Optimizer steps first .. first + steps - 1, as `blues train` runs them; their losses."""
    losses = [run.train_step(step)[0][0] / run.grad_accum for step in range(first, first + steps)]
    return [float(x) for x in torch.stack(losses).tolist()]


def time_blues(config, mixture, micro, seq_len, warmup, steps, peak, overrides=None, grad_accum=1) -> dict:
    """Training tokens/s through the DeepSpeed engine; micro=0 picks the micro-batch as
    `blues train` does (largest that fits, by probing) for grad_accum x micro sequences."""
    torch.manual_seed(0)
    on_gpu = torch.cuda.is_available()
    if micro == 0:
        probe = TrainingConfig(global_batch_tokens=grad_accum * seq_len, seq_len=seq_len)
        micro, grad_accum = train.batch_layout(probe, 1, BluesLM(config), torch.device("cuda" if on_gpu else "cpu"))
        release()
    engine = blues_engine(config, micro, grad_accum, on_gpu, on_gpu, overrides)
    run = blues_run(engine, mixture, config, seq_len, micro, grad_accum)
    run_steps(run, 1, warmup)
    sync()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses = run_steps(run, warmup + 1, steps)
    sync()
    elapsed = time.perf_counter() - t0
    tokens_per_s = steps * grad_accum * micro * seq_len / elapsed
    result = {"tokens_per_s": tokens_per_s, "step_s": elapsed / steps, "last_loss": losses[-1],
              "micro_batch": micro, "grad_accum": grad_accum, "flops_per_token": flops_per_token(config, seq_len),
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None}
    result["mfu"] = result["flops_per_token"] * tokens_per_s / peak if peak else None
    del engine, run
    release()
    return result


def release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def mixtral_config(config: BluesConfig, router_logits: bool = True):
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=config.padded_vocab_size, hidden_size=config.d_model,
                         intermediate_size=config.ffn_hidden, num_hidden_layers=config.n_layers,
                         num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
                         num_local_experts=config.n_experts, num_experts_per_tok=config.top_k,
                         max_position_embeddings=config.max_seq_len, tie_word_embeddings=True,
                         attn_implementation="sdpa", router_aux_loss_coef=config.aux_loss_coef,
                         output_router_logits=router_logits)


def time_mixtral(config, mixture, micro, seq_len, warmup, steps, peak, grad_accum=1) -> dict:
    from transformers import MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(mixtral_config(config)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    stream = iter(PackedSequenceDataset(mixture, seq_len, seed=0))

    def step():
        for _ in range(grad_accum):
            windows = torch.stack([next(stream) for _ in range(micro)]).cuda()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(input_ids=windows[:, :-1], labels=windows[:, :-1])
            (out.loss / grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - t0
    tokens_per_s = steps * grad_accum * micro * seq_len / elapsed
    del model, opt
    release()
    return {"tokens_per_s": tokens_per_s, "step_s": elapsed / steps, "mfu": flops_per_token(config, seq_len) * tokens_per_s / peak,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def time_decode(config, batch, prompt_len, new_tokens, hf: bool) -> float:
    """Generated tokens per second (all rows), greedy, never stopping early."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    prompts = torch.randint(0, config.vocab_size, (batch, prompt_len))
    if hf:
        from transformers import MixtralForCausalLM

        model = MixtralForCausalLM(mixtral_config(config, router_logits=False)).to(device, dtype).eval()

        def run():
            model.generate(prompts.to(device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0)
    else:
        model = BluesLM(config).to(device, dtype).eval()

        def run():
            generate(model, prompts.tolist(), new_tokens, temperature=0, eos_id=None)
    run()
    sync()
    t0 = time.perf_counter()
    run()
    sync()
    elapsed = time.perf_counter() - t0
    del model
    release()
    return batch * new_tokens / elapsed


def loss_parity(config, mixture, micro, seq_len, steps) -> dict:
    """Fast path (bf16, compiled blocks, DeepSpeed) vs plain path (fp32, eager, DeepSpeed):
    same init, same windows, same router noise (inductor told to use eager's RNG)."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()  # recompile under fallback_random: the config is not part of dynamo's guards
    inductor_config.fallback_random = True
    curves = {}
    on_gpu = torch.cuda.is_available()
    for name, fast in (("fast", on_gpu), ("plain", False)):
        torch.manual_seed(0)
        engine = blues_engine(config, micro, 1, compile_blocks=fast, bf16=fast)
        curves[name] = run_steps(blues_run(engine, mixture, config, seq_len, micro), 1, steps)
        del engine
        release()
    inductor_config.fallback_random = False
    diffs = [abs(a - b) / b for a, b in zip(curves["fast"], curves["plain"])]
    return {"steps": steps, "fast": curves["fast"], "plain": curves["plain"], "max_rel_diff": max(diffs),
            "ok": max(diffs) < 0.02}


def section(results: dict, name: str, fn, *args):
    """Run one measurement; on a lent GPU a failure must not cost the others."""
    try:
        results[name] = fn(*args)
        print(f"{name}: {results[name]}", flush=True)
    except Exception as exc:  # noqa: BLE001 - recorded in the results and printed
        import traceback

        traceback.print_exc()
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        release()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, few steps: check the script runs")
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--parity_steps", type=int, default=20)
    p.add_argument("--corpus_mb", type=float, default=8.0)
    p.add_argument("--global_batch_tokens", type=int, default=524288, help="blues train's default batch")
    p.add_argument("--skip", nargs="*", default=[], choices=["mixtral", "decode", "parity", "allmoe", "levers", "matched_batch"])
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    if args.smoke:
        config = BluesConfig.preset("tiny")
        args.micro, args.seq_len, args.warmup, args.steps, args.parity_steps = 2, 64, 1, 2, 3
        args.corpus_mb, args.global_batch_tokens = 1.0, 256
    else:
        config = BluesConfig.preset("blues-01")
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.smoke:
        raise SystemExit("no CUDA GPU: run with --smoke to check the script on a CPU")
    train.init_distributed()
    have_hf = True
    try:
        import transformers  # noqa: F401
    except ImportError:
        have_hf = False

    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": torch.cuda.get_device_name() if on_gpu else "cpu",
               "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
               "torch": torch.__version__, "micro_batch": args.micro, "seq_len": args.seq_len}
    peak = matmul_peak(8192, 20) if on_gpu else None
    results["matmul_peak_tflops"] = peak / 1e12 if peak else None
    print(f"bf16 matmul peak: {results['matmul_peak_tflops']}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        mixture = build_mixture(Path(tmp), args.corpus_mb)
        timed = (args.micro, args.seq_len, args.warmup, args.steps, peak)
        section(results, "blues01_train_layout", time_blues, config, mixture, 0, args.seq_len, 2, max(2, args.steps // 4),
                peak, None, args.global_batch_tokens // args.seq_len)
        section(results, "blues01", time_blues, config, mixture, *timed)
        if "levers" not in args.skip:
            results["levers"] = {}
            for name, overrides in LEVERS.items():
                section(results["levers"], name, time_blues, config, mixture, *timed, overrides)
        all_moe = BluesConfig.from_dict({**config.to_dict(), "moe_every": 1})
        if "allmoe" not in args.skip:
            section(results, "blues_all_moe", time_blues, all_moe, mixture, *timed)
        if have_hf and on_gpu and "mixtral" not in args.skip:
            section(results, "mixtral", time_mixtral, all_moe, mixture, *timed)
        if have_hf and on_gpu and "matched_batch" not in args.skip:
            ga = args.global_batch_tokens // (args.micro * args.seq_len)
            section(results, "blues_all_moe_global_batch", time_blues, all_moe, mixture, args.micro, args.seq_len,
                    2, 3, peak, None, ga)
            section(results, "mixtral_global_batch", time_mixtral, all_moe, mixture, args.micro, args.seq_len,
                    1, 2, peak, ga)
        if "decode" not in args.skip:
            new = 8 if args.smoke else 128
            results["decode"] = {}
            for b in (1, 32):
                section(results["decode"], f"blues_b{b}", time_decode, config, b, 64, new, False)
                if have_hf:
                    section(results["decode"], f"hf_b{b}", time_decode, all_moe, b, 64, new, True)
        if "parity" not in args.skip:
            section(results, "parity", loss_parity, config, mixture, args.micro, args.seq_len, args.parity_steps)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    b = results["blues01_train_layout"]
    results.update(mfu=b.get("mfu"), tokens_per_s=b.get("tokens_per_s"), peak_mem_gib=b.get("peak_mem_gib"),
                   peer_tokens_per_s=results.get("mixtral", {}).get("tokens_per_s"))
    print_table(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def print_table(r: dict) -> None:
    peer = r.get("mixtral", {}).get("tokens_per_s")
    print(f"\n{'run':<40}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'vs Mixtral':>12}")
    rows = {name: r.get(name, {}) for name in ("blues01_train_layout", "blues01", "blues_all_moe", "mixtral",
                                               "blues_all_moe_global_batch", "mixtral_global_batch")}
    rows.update({f"blues01 {k}": v for k, v in r.get("levers", {}).items()})
    for name, x in rows.items():
        if "tokens_per_s" in x:
            mfu = f"{x['mfu']:.1%}" if x.get("mfu") else "-"
            mem = f"{x['peak_mem_gib']:.1f}" if x.get("peak_mem_gib") else "-"
            ratio = f"{x['tokens_per_s'] / peer:.2f}x" if peer else "-"
            print(f"{name:<40}{x['tokens_per_s']:>12,.0f}{mfu:>8}{mem:>10}{ratio:>12}")
    for name, value in r.get("decode", {}).items():
        if isinstance(value, float):
            print(f"decode {name:<15}{value:>12,.0f}")
    if "max_rel_diff" in r.get("parity", {}):
        print(f"loss parity over {r['parity']['steps']} steps: max relative diff "
              f"{r['parity']['max_rel_diff']:.2e} ({'ok' if r['parity']['ok'] else 'FAILED'})")


if __name__ == "__main__":
    sys.exit(main())
