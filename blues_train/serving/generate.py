"""`blues generate`: sample text from a trained checkpoint, or measure perplexity (generate.py).

    blues generate --checkpoint runs/demo --prompt "def main(" --max_length 50 --temperature 0
    blues generate --checkpoint runs/demo/checkpoints/step-000100 --eval_file notes.txt

Python API:
    from blues_train.serving.generate import load_model, sample_text
    model = load_model("runs/demo/checkpoints/step-000100")
    print(sample_text(model, prompt="Once", max_length=40, temperature=0.8, top_p=0.95, top_k=50))

A checkpoint is read from its `model.safetensors` and `config.json` only: no pickle is ever
loaded, so no code from the file can run, and DeepSpeed is not needed. The files are checked
first against the sha256s its `meta.json` records, and the weights' header against the
config before anything is allocated.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from blues_model import BluesConfig, BluesLM, RunOptions
from blues_model.config import ATTENTION_MASKS
from blues_model.generation import generate, perplexity
from blues_model.moe import EXPERT_BIAS
from blues_train.data import tokenizer
from blues_train.io import command_line, storage
from blues_train.io.errors import BluesError
from blues_train.training import checkpoint, remote_run

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}  # safetensors' names of the dtypes weights may have


def checkpoint_folder(path) -> Path:
    """A folder holding model.safetensors: given directly, or the latest complete checkpoint
    of a run folder (OUT) or of its checkpoints/ folder."""
    path = Path(path)
    if path.is_file() and path.name == checkpoint.MODEL_FILE:
        return path.parent
    if not path.is_dir():
        raise BluesError(f"--checkpoint {path}: no such folder; pass a run folder or a checkpoint "
                         f"folder holding {checkpoint.MODEL_FILE}")
    if (path / checkpoint.MODEL_FILE).exists() or (path / checkpoint.CONFIG_FILE).exists():
        return path
    for root in (path / "checkpoints", path):
        found = checkpoint.complete_checkpoints(root)
        if found:
            return found[-1]
    raise BluesError(f"--checkpoint {path}: holds neither {checkpoint.MODEL_FILE} nor a complete "
                     "checkpoints/step-N folder; train first (blues train) or pass another path")


def load_model(path, device: str | None = None) -> BluesLM:
    """The model of a checkpoint folder (or run folder), in eval mode, on `device`
    (default: cuda when available)."""
    if storage.is_remote(path):  # its weights and config, each checked against meta.json's sha256
        folder = remote_run.fetch_model(path)
    else:
        folder = checkpoint_folder(path)
    options = RunOptions()
    if (folder / checkpoint.META_FILE).exists():  # a folder Blues saved: nothing changed since
        checkpoint.verify_files(folder)
        options = trained_options(folder)
    config_path, weights_path = folder / checkpoint.CONFIG_FILE, folder / checkpoint.MODEL_FILE
    config = read_config(config_path)
    if not weights_path.is_file():
        raise BluesError(f"{weights_path}: missing; the checkpoint is incomplete, pick another one")
    with torch.device("meta"):
        model = BluesLM(config, options)  # names and shapes only: no memory until the weights pass the checks
    weights = read_weights(weights_path, model.state_dict(), config_path)
    model.load_state_dict(weights, assign=True)  # the file's tensors become the parameters
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()


def trained_options(folder: Path) -> RunOptions:
    """The run options a checkpoint's windows are scored with: its run's --attention_mask
    (meta.json; runs from before it attended causally)."""
    mask = checkpoint.read_meta(folder).get("attention_mask", "causal")
    if mask not in ATTENTION_MASKS:
        raise BluesError(f"{folder / checkpoint.META_FILE}: attention_mask {mask!r} is none of "
                         f"{', '.join(ATTENTION_MASKS)}; pick another checkpoint")
    return RunOptions(attention_mask=mask)


def read_config(config_path: Path) -> BluesConfig:
    if not config_path.is_file():
        raise BluesError(f"{config_path}: missing; a checkpoint folder needs it beside {checkpoint.MODEL_FILE}")
    try:
        return BluesConfig.from_dict(storage.read_json(config_path))
    except (ValueError, TypeError) as exc:
        raise BluesError(f"{config_path}: not a Blues model config ({exc})") from None


def read_weights(weights_path: Path, expected: dict, config_path: Path) -> dict[str, torch.Tensor]:
    """The fp32 tensors of `weights_path`, read only once its header agrees with `expected`
    (the state dict of the model of `config_path`), and only if every value is finite."""
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            header = {name: (s.get_shape(), s.get_dtype()) for name, s in slices.items()}
            check_header(header, expected, weights_path, config_path)
            weights = {name: f.get_tensor(name) for name in header}
    except (SafetensorError, OSError, ValueError) as exc:
        raise BluesError(f"{weights_path}: corrupt or not a safetensors file ({exc}); "
                         "pick another checkpoint") from None
    bad = [f"{name} holds {'NaN' if t.isnan().any() else 'Inf'}"
           for name, t in weights.items() if not t.isfinite().all()]
    if bad:
        raise BluesError(f"{weights_path}: {', '.join(bad[:3])}; the run diverged before this save, "
                         "pick an earlier checkpoint")
    return {name: t.float() for name, t in weights.items()}


def check_header(header: dict, expected: dict, weights_path: Path, config_path: Path) -> None:
    """The file must hold exactly the model's tensors, in the model's shapes, as floats.
    `header` maps names to (shape, safetensors dtype name)."""
    missing = sorted(name for name in set(expected) - set(header)
                     if not name.endswith(EXPERT_BIAS))  # weights saved before it: zero, loaded so
    unexpected = sorted(set(header) - set(expected))
    wrong = [f"{name} {header[name][0]} vs {list(t.shape)}"
             for name, t in expected.items() if name in header and header[name][0] != list(t.shape)]
    if missing or unexpected or wrong:
        details = "; ".join(filter(None, [
            missing and f"missing {', '.join(missing[:3])}",
            unexpected and f"unexpected {', '.join(unexpected[:3])}",
            wrong and f"shape (file vs config) {', '.join(wrong[:3])}"]))
        raise BluesError(f"{weights_path} does not match the model of {config_path}: {details}; "
                         "the weights were saved with another model config")
    not_float = [f"{name} has dtype {dtype}" for name, (_, dtype) in header.items() if dtype not in FLOAT_DTYPES]
    if not_float:
        raise BluesError(f"{weights_path}: {', '.join(not_float[:3])}; model weights are floating point "
                         f"({', '.join(sorted(FLOAT_DTYPES))}), pick another checkpoint")


def check_sampling(max_length, temperature, top_p, top_k, prefix: str = "") -> None:
    """Refuse settings generation cannot use; `prefix` "--" names them as command-line flags."""
    def integer(x):
        return isinstance(x, int) and not isinstance(x, bool)

    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    rules = [
        ("max_length", max_length, integer(max_length) and max_length >= 1, "an integer >= 1"),
        ("temperature", temperature, number(temperature) and temperature >= 0, "a finite number >= 0 (0 = greedy)"),
        ("top_p", top_p, number(top_p) and 0 < top_p <= 1, "a number in (0, 1] (1 = no top-p cut)"),
        ("top_k", top_k, integer(top_k) and top_k >= 0, "an integer >= 0 (0 = no top-k cut)"),
    ]
    for name, value, ok, valid in rules:
        if not ok:
            raise BluesError(f"{prefix}{name} must be {valid}, got {value!r}")


def sample_text(model: BluesLM, prompt: str, max_length: int = 100, temperature: float = 1.0,
                top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> str:
    """The prompt followed by at most `max_length` new tokens (stopping at <|endoftext|>).
    temperature 0 is greedy."""
    check_sampling(max_length, temperature, top_p, top_k)
    ids = tokenizer.encode(prompt) or [tokenizer.EOT_ID]
    if len(ids) >= model.config.max_seq_len:
        raise BluesError(f"the prompt has {len(ids)} tokens; the model reads at most "
                         f"{model.config.max_seq_len - 1} before generating")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    new = generate(model, [ids], max_length, temperature=temperature, top_p=top_p, top_k=top_k,
                   eos_id=tokenizer.EOT_ID, generator=generator)[0]
    return prompt + tokenizer.decode(new)


def evaluate_perplexity(model: BluesLM, text: str) -> float:
    """Perplexity of `text` under the model (sliding windows of max_seq_len tokens)."""
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise BluesError(f"perplexity needs a text of at least 2 tokens, got {len(ids)}")
    return perplexity(model, ids)


def flag_parser() -> argparse.ArgumentParser:
    p = command_line.flag_parser("blues generate", __doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (step-N) or run folder (latest checkpoint)")
    p.add_argument("--prompt", default="", help="text to continue (default: none, start after <|endoftext|>)")
    p.add_argument("--max_length", type=int, default=100, help="new tokens at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling: the smallest set of tokens "
                   "holding this probability; 1 = no cut")
    p.add_argument("--top_k", type=int, default=50, help="0 = no top-k cut")
    p.add_argument("--seed", type=int, default=None, help="for repeatable sampling (default: none, a fresh draw)")
    p.add_argument("--eval_text", default=None, help="print the perplexity of this text instead (default: none)")
    p.add_argument("--eval_file", default=None,
                   help="print the perplexity of this file's text instead (default: none)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    return p


def parse_args(argv):
    args = flag_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BluesError("--device cuda: this machine has no CUDA GPU (torch sees none); use --device cpu")
    check_sampling(args.max_length, args.temperature, args.top_p, args.top_k, prefix="--")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    model = load_model(args.checkpoint, args.device)
    if args.eval_text is not None or args.eval_file is not None:
        text = args.eval_text
        if args.eval_file is not None:
            try:
                text = storage.read_bytes(args.eval_file).decode("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise BluesError(f"--eval_file {args.eval_file}: cannot read it as UTF-8 text ({exc})") from None
        print(f"perplexity: {evaluate_perplexity(model, text):.4f}")
        return 0
    print(sample_text(model, prompt=args.prompt, max_length=args.max_length, temperature=args.temperature,
                      top_p=args.top_p, top_k=args.top_k, seed=args.seed))
    return 0


if __name__ == "__main__":
    from blues_train.io.command_line import run_command

    sys.exit(run_command(main, sys.argv[1:]))
