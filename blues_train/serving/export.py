"""`blues export`: a checkpoint as a Hugging Face folder (transformers, vLLM, lm-eval).

transformers, vLLM and lm-evaluation-harness load the folder with no custom code.

    blues export --checkpoint runs/demo --out exports/demo [--dtype bfloat16|float32]

The folder holds an existing transformers architecture that computes what Blues computes:

- `Qwen2MoeForCausalLM` when dense and MoE layers alternate (`moe_every` > 1): its layer i
  is MoE when (i + 1) % decoder_sparse_step == 0, Blues' rule. Its shared expert is made to
  add exactly zero: zero weights (so its output is 0) under a zero gate. Its q/k/v biases are
  zeros too: vLLM and transformers 4.x always build them.
- `MixtralForCausalLM` when every layer is MoE (`moe_every` = 1).

Both: pre-norm RMSNorm in fp32, rotate-half RoPE (Blues' layout: channel i pairs with
i + head_dim / 2, so q and k need no permutation), multi-query attention through
num_key_value_heads, SwiGLU experts, softmax over the router logits renormalized over the
top-k (what Blues' softmax of the top-k logits is), tied embeddings. Only the 200,019 real
vocabulary rows are written, so no padding id can be produced. Blues' router noise is a
training-time term and is not exported.

The tokenizer (`tokenizer.json`) is o200k_base converted offline from the shipped
vocabulary, as transformers' TikTokenConverter does: byte-level BPE whose merges are every
split of each token into two tokens, ordered by the token's rank; `<|endoftext|>` (EOS) and
`<|endofprompt|>` are added special tokens with their tiktoken ids. Like every Hugging Face
tokenizer it reads special-token strings in text as those tokens; `tokenizer(text,
split_special_tokens=True)` gives exactly tiktoken's `encode_ordinary(text)`.

The folder is written beside `--out` into a temporary folder the command makes itself
(`.tmp-NAME-xxxxxxxx`, a fresh unique name) and renamed when complete. Only a folder that
holds `blues_export.json` (an earlier export) is replaced, never through a symbolic link; it
is moved into another fresh folder (`.old-NAME-xxxxxxxx`) and deleted once the new one is in
place. An export killed midway leaves its `.tmp-NAME-*` folder, which may be deleted.
"""

from __future__ import annotations

import argparse
import base64
import functools
import importlib.metadata
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from blues_model import BluesConfig, BluesLM
from blues_model.moe import EXPERT_BIAS
from blues_train.data import tokenizer
from blues_train.io import command_line, storage
from blues_train.io.atomic import (
    FILE_MODE,
    check_output_folder,
    folder_error,
    fresh_folder,
    os_error,
    sync_dir,
    write_atomic,
    write_json_atomic,
)
from blues_train.io.errors import BluesError
from blues_train.io.folder_lock import exclusive_writer
from blues_train.serving.export_dtypes import DEFAULT_DTYPE, DTYPES
from blues_train.serving.generate import checkpoint_folder, load_model
from blues_train.serving.model_card import model_card, training_lineage
from blues_train.training import checkpoint, remote_run

QWEN2_MOE, MIXTRAL = "Qwen2MoeForCausalLM", "MixtralForCausalLM"
EXPORT_FILE = "blues_export.json"  # provenance; also marks a folder an earlier export wrote
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
MIN_TRANSFORMERS = "4.57.0"  # the `export` extra's floor: the oldest transformers that reads these keys


def architecture(config: BluesConfig) -> str:
    return MIXTRAL if config.moe_every == 1 else QWEN2_MOE


def shared_expert_size(config: BluesConfig) -> int:
    """Width of Qwen2-MoE's (zeroed) shared expert. Not 0: transformers would then report
    its weights missing, and vLLM fails on them when present. Small, but divisible by every
    tensor-parallel degree the attention heads and FFN widths allow (vLLM splits it too)."""
    return math.gcd(config.n_heads, config.ffn_hidden)


def transformers_version() -> str:
    """What save_pretrained writes as config.json's `transformers_version`: without it,
    transformers 5 takes the o200k_base tokenizer for a Mistral one and warns of a wrong regex."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return MIN_TRANSFORMERS


def hf_config(config: BluesConfig, dtype: str) -> dict:
    """config.json: keys transformers 4.x and 5.x and vLLM all read."""
    common = {
        "transformers_version": transformers_version(),
        "architectures": [architecture(config)],
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "attention_dropout": 0.0,
        "num_experts_per_tok": config.top_k,
        "router_aux_loss_coef": config.aux_loss_coef,
        "output_router_logits": False,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": tokenizer.EOT_ID,
        "pad_token_id": tokenizer.EOT_ID,
        "initializer_range": config.init_std,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if architecture(config) == MIXTRAL:
        return {**common, "model_type": "mixtral", "intermediate_size": config.ffn_hidden,
                "num_local_experts": config.n_experts, "sliding_window": None, "router_jitter_noise": 0.0}
    return {**common, "model_type": "qwen2_moe",
            "intermediate_size": config.ffn_hidden,  # the dense layers' FFN
            "moe_intermediate_size": config.ffn_hidden,
            "shared_expert_intermediate_size": shared_expert_size(config),
            "decoder_sparse_step": config.moe_every,
            "mlp_only_layers": [],
            "num_experts": config.n_experts,
            "norm_topk_prob": True,
            "qkv_bias": True,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": config.n_layers}


def hf_weights(model: BluesLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Blues' state dict under the Hugging Face names and layouts (per-expert tensors, as on
    the Hub: what transformers 4.x, 5.x and vLLM load)."""
    c = model.config
    sd = {name: t.detach() for name, t in model.state_dict().items()}
    mixtral = architecture(c) == MIXTRAL
    q_rows, kv_rows = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    out = {"model.embed_tokens.weight": sd["embed.weight"][: c.vocab_size], "model.norm.weight": sd["norm.weight"]}
    for i in range(c.n_layers):
        b, p = f"blocks.{i}.", f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = sd[b + "attn_norm.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[b + "ffn_norm.weight"]
        q, k, v = sd[b + "attn.qkv.weight"].split([q_rows, kv_rows, kv_rows])
        attn = {"q_proj": q, "k_proj": k, "v_proj": v}
        for name, w in attn.items():
            out[f"{p}self_attn.{name}.weight"] = w
            if not mixtral:
                out[f"{p}self_attn.{name}.bias"] = w.new_zeros(w.shape[0])
        out[p + "self_attn.o_proj.weight"] = sd[b + "attn.out.weight"]
        if i not in c.moe_layers:
            gate, up = sd[b + "ffn.gate_up.weight"].chunk(2, dim=0)  # Linear rows: gate block first
            out.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                        p + "mlp.down_proj.weight": sd[b + "ffn.down.weight"]})
            continue
        # Blues computes x @ w (w_gate_up [E, D, 2H], w_down [E, H, D]); HF Linears x @ w.T.
        w_gate_up, w_down = sd[b + "ffn.w_gate_up"], sd[b + "ffn.w_down"]
        moe = p + ("block_sparse_moe." if mixtral else "mlp.")
        out[moe + "gate.weight"] = sd[b + "ffn.router.w_gate"].T
        names = ("w1", "w3", "w2") if mixtral else ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
        for e in range(c.n_experts):
            gate, up = w_gate_up[e].T.chunk(2, dim=0)
            for name, w in zip(names, (gate, up, w_down[e].T)):
                out[f"{moe}experts.{e}.{name}" + (".weight" if mixtral else "")] = w
        if not mixtral:
            zeros, width = w_down.new_zeros, shared_expert_size(c)
            out.update({moe + "shared_expert.gate_proj.weight": zeros(width, c.d_model),
                        moe + "shared_expert.up_proj.weight": zeros(width, c.d_model),
                        moe + "shared_expert.down_proj.weight": zeros(c.d_model, width),
                        moe + "shared_expert_gate.weight": zeros(1, c.d_model)})
    # Own copies: q, k and v are views of one tensor, which safetensors may refuse to save.
    return {name: t.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True) for name, t in out.items()}


def check_routing(model: BluesLM, where: str) -> None:
    """Refuse a model trained with --router_balance bias/both: its per-expert routing bias
    changes which experts a token picks, and the HF routers (Qwen2-MoE, Mixtral) hold none."""
    biased = [name for name, t in model.state_dict().items() if name.endswith(EXPERT_BIAS) and t.any()]
    if biased:
        raise BluesError(f"{where}: its routers hold a trained {EXPERT_BIAS} ({biased[0]}, from "
                         f"--router_balance bias/both) that {architecture(model.config)} cannot represent: "
                         "exported, it would route tokens to other experts; export a run trained with "
                         "--router_balance aux_loss")


def parameter_count(weights: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in weights.values())


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet of byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return table


def bpe_ranks() -> dict[bytes, int]:
    ranks = {}
    for line in tokenizer.vocabulary_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def tokenizer_json() -> str:
    """tokenizer.json of o200k_base, built from the shipped vocabulary (no network)."""
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    except ImportError:
        raise BluesError("blues export needs the tokenizers package: pip install 'blues[export]'") from None

    ranks = bpe_ranks()
    table = str.maketrans({chr(b): s for b, s in byte_to_unicode().items()})

    def text(token: bytes) -> str:
        return token.decode("latin-1").translate(table)

    splits = sorted((rank, ranks[token[:i]], ranks[token[i:]], token, i)
                    for token, rank in ranks.items() for i in range(1, len(token))
                    if token[:i] in ranks and token[i:] in ranks)
    merges = [(text(token[:i]), text(token[i:])) for _, _, _, token, i in splits]
    specials = {tokenizer.EOT_TOKEN: tokenizer.EOT_ID, tokenizer.EOP_TOKEN: tokenizer.EOP_ID}
    vocab = {**{text(token): rank for token, rank in ranks.items()}, **specials}  # specials keep their ids
    bpe = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if any(bpe.token_to_id(t) != i for t, i in specials.items()):
        raise RuntimeError("the special tokens did not keep their o200k_base ids")
    return bpe.to_str()


def tokenizer_files(max_len: int) -> dict[str, dict | str]:
    eos = tokenizer.EOT_TOKEN
    return {
        "tokenizer.json": tokenizer_json(),
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",  # load tokenizer.json as it is
            "eos_token": eos, "pad_token": eos, "bos_token": None, "unk_token": None,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": max_len,
        },
        "special_tokens_map.json": {"eos_token": eos, "pad_token": eos},
    }


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise BluesError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")


def check_out(out: Path) -> None:
    """`out` can be written, and is nothing yet, an empty folder or an earlier export."""
    check_output_folder(out, "--out")
    if out.is_symlink():
        raise BluesError(f"--out {out}: is a symbolic link; name the folder itself, or choose another folder")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise BluesError(f"--out {out}: exists and is not a folder blues export wrote; "
                         "remove it or choose another folder")


def is_export(folder: Path) -> bool:
    """A folder (not a symbolic link) that an earlier `blues export` wrote."""
    return folder.is_dir() and not folder.is_symlink() and (folder / EXPORT_FILE).is_file()


def write_export(model: BluesLM, out, dtype: str = DEFAULT_DTYPE, source: dict | None = None,
                 progress: bool = False) -> dict:
    """Write the Hugging Face folder of `model` to `out` atomically; return its summary
    (the contents of blues_export.json) and its path. `progress`: a bar of the files written
    on a terminal's stderr."""
    check_dtype(dtype)
    check_routing(model, (source or {}).get("checkpoint", "the model"))
    out = Path(out)
    check_out(out)
    c = model.config
    weights = hf_weights(model, getattr(torch, dtype))
    summary = {
        "architecture": architecture(c), "dtype": dtype, "parameters": parameter_count(weights),
        "vocab_size": c.vocab_size, "layers": c.n_layers, "moe_layers": len(c.moe_layers),
        "hidden_size": c.d_model, "experts": c.n_experts, "top_k": c.top_k,
        "max_seq_len": c.max_seq_len, "tokenizer": tokenizer.tokenizer_info(),
        "blues_config": c.to_dict(), "source": source or {},
    }
    files = {
        "config.json": hf_config(c, dtype),
        "generation_config.json": {"bos_token_id": None, "eos_token_id": tokenizer.EOT_ID,
                                   "pad_token_id": tokenizer.EOT_ID},
        **tokenizer_files(c.max_seq_len),
        CARD_FILE: model_card(summary, str(out)),
    }
    with exclusive_writer(out):  # one export into `out` at a time
        tmp = None
        try:
            tmp = fresh_folder(out.parent, f".tmp-{out.name}-")
            write_folder(tmp, weights, files, summary, progress)
            replace_folder(tmp, out)
        except BaseException as exc:
            where, reason = tmp or out.parent, None
            if isinstance(exc, OSError):
                reason = os_error(exc, where, "writing the export")
            elif isinstance(exc, (RuntimeError, SafetensorError)):  # safetensors words a full disk so
                reason = folder_error(where, "writing the export")
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if reason is None:
                raise
            raise reason from None
    return {**summary, "path": str(out)}


def write_folder(folder: Path, weights: dict, files: dict, summary: dict, progress: bool = False) -> None:
    for name in command_line.progress([WEIGHTS_FILE, *files], "export", progress, unit="file"):
        if name == WEIGHTS_FILE:
            save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
            os.chmod(folder / WEIGHTS_FILE, FILE_MODE)  # safetensors creates it private (0600)
            continue
        content = files[name]
        data = content if isinstance(content, str) else json.dumps(content, indent=2, ensure_ascii=False) + "\n"
        write_atomic(folder / name, data.encode("utf-8"))
    summary["bytes"] = sum(p.stat().st_size for p in folder.iterdir())
    write_json_atomic(folder / EXPORT_FILE, summary)  # last: its presence marks a whole export
    checkpoint.fsync_tree(folder)


def replace_folder(new: Path, out: Path) -> None:
    """Rename `new` to `out` (replacing the empty folder the writer lock made). An earlier
    export there is first moved into a fresh folder of ours, deleted once `new` is in place."""
    if not is_export(out):
        os.rename(new, out)
        sync_dir(out.parent)
        return
    aside = fresh_folder(out.parent, f".old-{out.name}-")
    try:
        os.rename(out, aside / out.name)
        try:
            os.rename(new, out)
        except OSError:
            os.rename(aside / out.name, out)  # the earlier export stays
            raise
        sync_dir(out.parent)
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def export(checkpoint_path, out, dtype: str = DEFAULT_DTYPE, progress: bool = False) -> dict:
    """Export the checkpoint (a step-N folder, or a run folder's latest) to `out` (`progress`: a
    bar of the files written on a terminal's stderr)."""
    check_dtype(dtype)
    if storage.is_remote(out):
        raise BluesError(f"--out {out}: an export is written to a local folder (transformers and vLLM load "
                         "from one); export here, then copy the folder to the bucket")
    folder = remote_run.fetch_model(checkpoint_path) if storage.is_remote(checkpoint_path) else \
        checkpoint_folder(checkpoint_path)
    if Path(out).resolve().is_relative_to(folder.resolve()):
        raise BluesError(f"--out {out}: inside the checkpoint {folder}, whose recorded files it would "
                         "change; choose a folder outside it")
    check_out(Path(out))
    model = load_model(folder, device="cpu")  # hashes checked, safetensors only
    meta_path = folder / checkpoint.META_FILE
    source = {"checkpoint": str(checkpoint_path) if storage.is_remote(checkpoint_path) else str(folder.resolve())}
    if meta_path.is_file():
        meta = checkpoint.read_meta(folder)
        source.update(step=meta.get("step"), model_sha256=(meta.get("files") or {}).get(checkpoint.MODEL_FILE),
                      training=training_lineage(meta))
    return write_export(model, out, dtype, source, progress)


def flag_parser() -> argparse.ArgumentParser:
    p = command_line.flag_parser("blues export", __doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (step-N) or run folder (latest checkpoint)")
    p.add_argument("--out", required=True, help="folder to write (replaced if an earlier export wrote it)")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=tuple(DTYPES),
                   help=f"the weights' dtype (default {DEFAULT_DTYPE})")
    return p


def parse_args(argv):
    return flag_parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    summary = export(args.checkpoint, args.out, args.dtype, progress=True)
    print(f"wrote {summary['path']}: {summary['architecture']}, {summary['dtype']}, "
          f"{summary['parameters']:,} parameters, {summary['bytes'] / 1e6:,.1f} MB")
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({summary['path']!r}); "
          f"serve it with vllm serve {summary['path']}")
    return 0


if __name__ == "__main__":
    from blues_train.io.command_line import run_command

    sys.exit(run_command(main, sys.argv[1:]))
