"""Decode throughput: Blues-01 greedy tokens/s at batch 1 and 32 (64-token prompts, 256 new
tokens), Blues' eager loop and its CUDA-graph path (decode.py, both MoE dispatches), against
Hugging Face `generate` on the exported model (blues_train/serving/export.py) with its dynamic cache
and with `cache_implementation="static"` (which transformers compiles, mode
"reduce-overhead": its fastest path). bf16 weights, random init (seed 0), random prompts;
generation never stops early (no end-of-text, `min_new_tokens` for HF). Each figure is
batch * new tokens / wall time of one whole `generate` call (prefill included), the median
of --repeats timed calls after a warm-up call (which compiles and captures). Also records
whether the fast path's greedy tokens equal the eager loop's, row by row.

    python benchmarks/decode_throughput.py            # on the GPU machine (one run, all figures)
    python benchmarks/decode_throughput.py --smoke    # CPU, tiny model: checks the script runs

Writes benchmarks/results/decode_throughput.json (after every measurement, so a run cut
short keeps what it measured) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from blues_model import BluesConfig, BluesLM
from blues_model.decode import StaticDecoder, default_dispatch
from blues_model.generation import generate
from blues_model.moe import DISPATCHES

RESULTS = Path(__file__).parent / "results" / "decode_throughput.json"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(run, repeats: int) -> tuple[float, object]:
    """(median seconds of `repeats` calls, the last call's result), after one untimed warm-up call."""
    run()
    sync()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def agreement(got: list[list[int]], want: list[list[int]]) -> dict:
    """Rows whose tokens are identical, and the first differing position of the others."""
    first_diff = [next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), None) for g, w in zip(got, want)]
    return {"rows_identical": sum(d is None for d in first_diff), "rows": len(got),
            "first_difference": [d for d in first_diff if d is not None][:8]}


def profile_step(dec) -> dict:
    """Kernels of one decode step (the graph replayed under the profiler): count, GPU time, top 8."""
    from torch.profiler import ProfilerActivity, profile

    dec.cache.reset()
    dec.slot_1.fill_(8)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            dec.advance()
        sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_name: dict[str, list] = {}
    for e in kernels:
        per_name.setdefault(e.name[:60], []).append(e.device_time)
    top = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:8]
    return {"kernels_per_step": len(kernels) / 5, "kernel_us_per_step": sum(e.device_time for e in kernels) / 5,
            "top": [(name, len(t) / 5, round(sum(t) / 5, 1)) for name, t in top]}


def measure_blues(model, prompts, new: int, repeats: int, results: dict, tag: str, eager_repeats: int,
                  scopes=("block",), profile: bool = False) -> None:
    B = len(prompts)
    row = results.setdefault(tag, {})
    ids = torch.tensor(prompts, device=model.embed.weight.device)
    valid = torch.ones_like(ids, dtype=torch.bool)

    def eager():
        return generate(model, prompts, new, temperature=0, eos_id=None, fast=False)

    def public():  # what `blues generate` and sample_text call: the fast path on CUDA
        return generate(model, prompts, new, temperature=0, eos_id=None)

    s, eager_out = timed(eager, eager_repeats)
    row["blues_eager"] = {"tokens_per_s": B * new / s, "seconds": s}
    print(f"{tag} blues_eager: {row['blues_eager']}", flush=True)
    if not model.embed.weight.is_cuda:
        row["_eager_tokens"] = eager_out
        return
    default = default_dispatch(model.config, model.embed.weight.dtype, model.embed.weight.device, B)
    t0 = time.perf_counter()
    public()  # first call: compile (once per process) and capture
    first = time.perf_counter() - t0
    s, out = timed(public, repeats)
    row["blues_generate"] = {"tokens_per_s": B * new / s, "seconds": s, "first_call_seconds": first,
                             "moe_dispatch": default, "greedy_vs_eager": agreement(out, eager_out)}
    print(f"{tag} blues_generate: {row['blues_generate']}", flush=True)
    for scope in scopes:
        for dispatch in DISPATCHES:
            name = f"blues_graph_{dispatch}_{scope}"
            try:
                t0 = time.perf_counter()
                dec = StaticDecoder(model, B, len(prompts[0]) + new, greedy=True, moe_dispatch=dispatch, scope=scope)
                first = time.perf_counter() - t0
                s, out = timed(lambda: dec.generate(ids, valid, new, lambda lg: lg.argmax(-1), None).tolist(), repeats)
                row[name] = {"tokens_per_s": B * new / s, "seconds": s, "capture_seconds": first,
                             "greedy_vs_eager": agreement(out, eager_out)}
                if profile:
                    row[name]["profile"] = profile_step(dec)
                del dec
            except Exception as exc:  # noqa: BLE001 - recorded, the other variants still run
                traceback.print_exc()
                row[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"{tag} {name}: {row[name]}", flush=True)
            release()
    row["_eager_tokens"] = eager_out


def measure_hf(folder: Path, prompts, new: int, repeats: int, results: dict, tag: str, static: bool,
               blues_tokens) -> None:
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True).to(device).eval()
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
    if static:
        kwargs["cache_implementation"] = "static"

    def run():
        return model.generate(ids, **kwargs)[:, ids.shape[1]:].tolist()

    t0 = time.perf_counter()
    run()  # warm-up: for the static cache, transformers compiles the decode forward here
    first = time.perf_counter() - t0
    s, out = timed(run, repeats if static else 1)
    name = "hf_static_compiled" if static else "hf_dynamic"
    results[tag][name] = {"tokens_per_s": len(prompts) * new / s, "seconds": s, "first_call_seconds": first,
                          "experts_implementation": getattr(model.config, "_experts_implementation", None),
                          "greedy_vs_blues_eager": agreement(out, blues_tokens)}
    print(f"{tag} {name}: {results[tag][name]}", flush=True)
    del model
    release()


def release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write(results: dict, out: Path) -> None:
    clean = {k: ({kk: vv for kk, vv in v.items() if not kk.startswith("_")} if isinstance(v, dict) else v)
             for k, v in results.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(clean, indent=2) + "\n")


def print_table(results: dict) -> None:
    print(f"\n{'batch':>5} {'path':<26} {'tokens/s':>10}  greedy = eager rows")
    for tag in ("b1", "b32"):
        for name, r in results.get(tag, {}).items():
            if name.startswith("_"):
                continue
            agree = r.get("greedy_vs_eager") or r.get("greedy_vs_blues_eager") or {}
            rows = f"{agree['rows_identical']}/{agree['rows']}" if agree else ""
            if "tokens_per_s" in r:
                print(f"{tag[1:]:>5} {name:<26} {r['tokens_per_s']:>10.0f}  {rows}")
    for tag, ratio in results.get("ratios", {}).items():
        print(f"{tag}: {ratio}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, few tokens: checks the script runs")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", nargs="*", default=[], choices=["hf_dynamic", "hf_static"])
    p.add_argument("--scopes", nargs="+", default=["block"], choices=["block", "step"],
                   help="what torch.compile covers in the variants timed: each block, or the whole step")
    p.add_argument("--profile", action="store_true", help="record each variant's kernels per step")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.smoke:
        raise SystemExit("no CUDA GPU: run with --smoke to check the script on a CPU")
    config = BluesConfig.preset("tiny" if args.smoke else "blues-01")
    if args.smoke:
        args.prompt_len, args.new_tokens, args.repeats = 8, 8, 1
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    import transformers

    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": torch.cuda.get_device_name() if on_gpu else "cpu",
               "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
               "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(dtype),
               "model": "blues-01" if not args.smoke else "tiny", "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens, "repeats": args.repeats}
    out = Path(args.out)
    torch.manual_seed(0)
    model = BluesLM(config).eval()
    from blues_train.serving.export import write_export

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        write_export(model, folder, dtype="bfloat16" if on_gpu else "float32")
        model = model.to(device, dtype)
        for B in args.batches:
            tag = f"b{B}"
            g = torch.Generator().manual_seed(B)
            prompts = torch.randint(0, config.vocab_size, (B, args.prompt_len), generator=g).tolist()
            try:
                measure_blues(model, prompts, args.new_tokens, args.repeats, results, tag, 1, args.scopes,
                              args.profile)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                results.setdefault("errors", []).append(f"blues {tag}: {type(exc).__name__}: {exc}")
            write(results, out)
            blues_tokens = results.get(tag, {}).get("_eager_tokens", [[]] * B)
            for static in (False, True):
                if ("hf_static" if static else "hf_dynamic") in args.skip:
                    continue
                try:
                    measure_hf(folder, prompts, args.new_tokens, args.repeats, results, tag, static, blues_tokens)
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    results.setdefault("errors", []).append(f"hf static={static} {tag}: {type(exc).__name__}: {exc}")
                write(results, out)
    ratios = {}
    for tag in (f"b{B}" for B in args.batches):
        r = results.get(tag, {})
        fast = r.get("blues_generate", {}).get("tokens_per_s")
        hf = max((v["tokens_per_s"] for k, v in r.items() if k.startswith("hf_")), default=None)
        if fast and hf:
            ratios[f"{tag}_blues_graph_over_hf_fastest"] = round(fast / hf, 2)
        if fast and "blues_eager" in r:
            ratios[f"{tag}_blues_graph_over_blues_eager"] = round(fast / r["blues_eager"]["tokens_per_s"], 2)
    results["ratios"] = ratios
    write(results, out)
    print_table(results)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
