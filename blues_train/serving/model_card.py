"""The model card of an export (`README.md` in the folder): what the model is, what it was
trained on back to the raw files' sha256, how far it trained, how it scored, how to load it.

`training_lineage` reads it from the checkpoint's `meta.json` and, where they still hold what
the run read, the mixture and its token stores; `model_card` writes it as Markdown.
"""

from __future__ import annotations

import math

from blues_model import BluesConfig
from blues_train.data.raw_corpus import corpus_version
from blues_train.data.store import read_manifest
from blues_train.io.errors import BluesError
from blues_train.mixture.spec import read_mixture

RAW_FILES_LISTED = 100  # per store; every one is in the store's manifest.json


def training_lineage(meta: dict) -> dict:
    """How far the checkpoint trained and on what: step, tokens, losses, the mixture and, when
    the mixture at its recorded path still has the recorded fingerprint, each token store with
    its raw files (at most RAW_FILES_LISTED each, and their count)."""
    mixture = meta.get("mixture") or {}
    lineage = {key: meta.get(key) for key in ("step", "tokens", "seq_len", "loss", "val_loss")}
    lineage["mixture"] = {"path": mixture.get("path"), "fingerprint": mixture.get("fingerprint")}
    lineage["stores"], lineage["stores_note"] = [], "the checkpoint records no mixture"
    if mixture.get("path"):
        try:
            lineage["stores"], lineage["stores_note"] = token_stores(mixture), ""
        except (BluesError, OSError) as exc:
            lineage["stores_note"] = f"the mixture could not be read at export time ({exc})"
    return lineage


def token_stores(mixture: dict) -> list[dict]:
    manifest = read_mixture(mixture["path"])
    if manifest["fingerprint"] != mixture["fingerprint"]:
        raise BluesError(f"{mixture['path']} now holds mixture {manifest['fingerprint'][:16]}, "
                         "not the one trained on")
    stores = []
    for source in manifest["sources"]:
        raw = read_manifest(source["path"])["sources"]
        stores.append({"path": source["path"], "fingerprint": source["fingerprint"], "share": source["weight"],
                       "tokens_per_pass": source["tokens"],
                       "raw_corpus_version": corpus_version([(f["path"], f["sha256"]) for f in raw]),
                       "raw_files": len(raw),
                       "raw_files_listed": [{"path": f["path"], "sha256": f["sha256"]} for f in raw[:RAW_FILES_LISTED]]})
    return stores


def model_card(summary: dict, path: str) -> str:
    """README.md of the export at `path`; `summary` is blues_export.json's contents."""
    lineage = summary["source"].get("training") or {}
    return "\n".join([
        f"# Blues model ({summary['architecture']})", "",
        "Trained with Blues and exported by `blues export`: it loads in transformers, "
        "vLLM and lm-evaluation-harness as an existing architecture, with no custom code.", "",
        *architecture_section(summary), *data_section(lineage), *evaluation_section(lineage),
        *usage_section(path), "",
    ])


def architecture_section(summary: dict) -> list[str]:
    c = BluesConfig(**summary["blues_config"])
    return ["## Architecture", "",
            f"- `{summary['architecture']}`, {summary['dtype']}, {summary['parameters']:,} parameters",
            f"- {c.n_layers} decoder layers, width {c.d_model}, {c.n_heads} query heads and "
            f"{c.n_kv_heads} key/value head(s) of {c.head_dim}, RoPE base {c.rope_base:g}",
            f"- {len(c.moe_layers)} mixture-of-experts layer(s) (blocks {', '.join(map(str, c.moe_layers))}) of "
            f"{c.n_experts} SwiGLU experts, top-{c.top_k}, hidden {c.ffn_hidden}; the others dense",
            f"- vocabulary: {summary['tokenizer']['name']} ({summary['vocab_size']:,} ids), context "
            f"{summary['max_seq_len']:,} tokens, tied embeddings", ""]


def data_section(lineage: dict) -> list[str]:
    mixture = lineage.get("mixture") or {}
    lines = ["## Training data", "",
             f"- steps: {lineage.get('step')}, tokens seen: {_count(lineage.get('tokens'))}, "
             f"sequence length {lineage.get('seq_len')}",
             f"- mixture: `{mixture.get('path')}`, fingerprint `{mixture.get('fingerprint')}`"]
    if not lineage.get("stores"):
        return lines + [f"- token stores: not listed: {lineage.get('stores_note') or 'no lineage recorded'}", ""]
    lines += ["", "| token store | fingerprint | share | tokens per pass | raw corpus version | raw files |",
              "|---|---|---|---|---|---|"]
    lines += [f"| `{s['path']}` | `{s['fingerprint']}` | {s['share']:.4f} | {s['tokens_per_pass']:,} | "
              f"`{s['raw_corpus_version']}` | {s['raw_files']} |" for s in lineage["stores"]]
    lines += ["", "Raw files (sha256):", ""]
    for s in lineage["stores"]:
        lines += [f"- `{f['path']}` `{f['sha256']}`" for f in s["raw_files_listed"]]
        if s["raw_files"] > len(s["raw_files_listed"]):
            lines.append(f"- … and {s['raw_files'] - len(s['raw_files_listed'])} more of `{s['path']}` "
                         "(all in its manifest.json)")
    return lines + [""]


def evaluation_section(lineage: dict) -> list[str]:
    if lineage.get("loss") is None:
        return []
    lines = ["## Evaluation", "", f"- training loss at step {lineage['step']}: {lineage['loss']:.4f}"]
    if lineage.get("val_loss") is not None:
        lines.append(f"- held-out loss: {lineage['val_loss']:.4f} (perplexity {math.exp(lineage['val_loss']):.2f}), "
                     "on the mixture's validation documents")
    return lines + [""]


def usage_section(path: str) -> list[str]:
    return ["## How to load it", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f"model = AutoModelForCausalLM.from_pretrained({path!r})",
            f"tokenizer = AutoTokenizer.from_pretrained({path!r})",
            'ids = tokenizer("def main(", return_tensors="pt")',
            "print(tokenizer.decode(model.generate(**ids, max_new_tokens=32, do_sample=False)[0]))",
            "```", "",
            f"`vllm serve {path}` serves it. `tokenizer(text, split_special_tokens=True)` encodes "
            "`<|endoftext|>` in text as ordinary text, as training did."]


def _count(value) -> str:
    return "unknown" if value is None else f"{value:,}"
