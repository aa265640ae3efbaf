"""`blues generate`: sample text from a trained checkpoint, or measure perplexity (generate.py).

    blues generate --checkpoint runs/demo --prompt "def main(" --max_length 50 --temperature 0
    blues generate --checkpoint runs/demo/checkpoints/step-000100 --eval_file notes.txt

Python API:
    from blues_train.generate import load_model, sample_text
    model = load_model("runs/demo/checkpoints/step-000100")
    print(sample_text(model, prompt="Once", max_length=40, temperature=0.8, top_p=0.95, top_k=50))

A checkpoint is read from its `model.safetensors` and `config.json` only: no pickle is ever
loaded, so no code from the file can run, and DeepSpeed is not needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from blues_model import BluesConfig, BluesLM
from blues_model.generation import generate, perplexity
from blues_train import checkpoint, tokenizer
from blues_train.errors import BluesError


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
    folder = checkpoint_folder(path)
    config_path, weights_path = folder / checkpoint.CONFIG_FILE, folder / checkpoint.MODEL_FILE
    try:
        config = BluesConfig.from_dict(json.loads(config_path.read_text()))
    except FileNotFoundError:
        raise BluesError(f"{config_path}: missing; a checkpoint folder needs it beside "
                         f"{checkpoint.MODEL_FILE}") from None
    except (ValueError, TypeError) as exc:
        raise BluesError(f"{config_path}: not a Blues model config ({exc})") from None
    if not weights_path.is_file():
        raise BluesError(f"{weights_path}: missing; the checkpoint is incomplete, pick another one")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BluesError(f"{weights_path}: corrupt or not a safetensors file ({exc}); "
                         "pick another checkpoint") from None
    model = BluesLM(config)
    check_weights(model, weights, weights_path, config_path)
    model.load_state_dict(weights)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()


def check_weights(model: BluesLM, weights: dict, weights_path: Path, config_path: Path) -> None:
    """The file must hold exactly the model's tensors, in the model's shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [f"{name} {list(weights[name].shape)} vs {list(t.shape)}"
             for name, t in expected.items() if name in weights and weights[name].shape != t.shape]
    if missing or unexpected or wrong:
        details = "; ".join(filter(None, [
            missing and f"missing {', '.join(missing[:3])}",
            unexpected and f"unexpected {', '.join(unexpected[:3])}",
            wrong and f"shape (file vs config) {', '.join(wrong[:3])}"]))
        raise BluesError(f"{weights_path} does not match the model of {config_path}: {details}; "
                         "the weights were saved with another model config")


def sample_text(model: BluesLM, prompt: str, max_length: int = 100, temperature: float = 1.0,
                top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> str:
    """The prompt followed by at most `max_length` new tokens (stopping at <|endoftext|>).
    temperature 0 is greedy."""
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


def parse_args(argv):
    p = argparse.ArgumentParser(prog="blues generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (step-N) or run folder (latest checkpoint)")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max_length", type=int, default=100, help="new tokens at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--top_k", type=int, default=50, help="0 = no top-k cut")
    p.add_argument("--seed", type=int, default=None, help="for repeatable sampling")
    p.add_argument("--eval_text", default=None, help="print the perplexity of this text instead")
    p.add_argument("--eval_file", default=None, help="print the perplexity of this file's text instead")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BluesError("--device cuda: this machine has no CUDA GPU (torch sees none); use --device cpu")
    if args.max_length < 1 or args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise BluesError("need --max_length >= 1, --temperature >= 0, 0 < --top_p <= 1, --top_k >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    model = load_model(args.checkpoint, args.device)
    if args.eval_text is not None or args.eval_file is not None:
        text = args.eval_text
        if args.eval_file is not None:
            try:
                text = Path(args.eval_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise BluesError(f"--eval_file {args.eval_file}: cannot read it as UTF-8 text ({exc})") from None
        print(f"perplexity: {evaluate_perplexity(model, text):.4f}")
        return 0
    print(sample_text(model, prompt=args.prompt, max_length=args.max_length, temperature=args.temperature,
                      top_p=args.top_p, top_k=args.top_k, seed=args.seed))
    return 0


if __name__ == "__main__":
    from blues_train.cli import run_command

    sys.exit(run_command(main, sys.argv[1:]))
