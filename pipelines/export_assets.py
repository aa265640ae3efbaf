"""`hf_model`: the last trained model as a Hugging Face folder (`blues export`), beside its
run: `OUT/run-<id>/hf/step-000100/`."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from blues_train.io.errors import BluesError
from blues_train.serving.export_dtypes import DEFAULT_DTYPE, DTYPES
from pipelines.assets import _latest_checkpoint, trained_model
from pipelines.versions import versioned_asset

HF_DIR = "hf"


class HfExportConfig(dg.Config):
    """Run config of hf_model."""

    dtype: str = Field(default=DEFAULT_DTYPE, description=f"the weights' dtype: {' or '.join(DTYPES)}")


def export_folder(checkpoint: Path) -> Path:
    """OUT/hf/step-N for the checkpoint OUT/checkpoints/step-N."""
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return run_dir / HF_DIR / checkpoint.name


def usage_markdown(path: str) -> str:
    return "\n".join([
        "```",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained({path!r})",
        f"tokenizer = AutoTokenizer.from_pretrained({path!r})",
        "```",
        f"`vllm serve {path}` · `lm_eval --model hf --model_args pretrained={path} --tasks hellaswag`",
    ])


@versioned_asset(runs=("blues_train.serving.export",), deps=[trained_model], group_name="training",
                 kinds={"huggingface", "safetensors"})
def hf_model(context: dg.AssetExecutionContext, config: HfExportConfig) -> dg.MaterializeResult:
    """The last trained model's checkpoint exported for transformers, vLLM and
    lm-evaluation-harness (an existing architecture, no custom code; the o200k_base
    tokenizer as tokenizer.json)."""
    checkpoint = _latest_checkpoint(context)
    try:
        from blues_train.serving.export import export  # imports torch: only where a model is exported

        summary = export(checkpoint, export_folder(checkpoint), config.dtype)
    except BluesError as exc:
        raise dg.Failure(description=str(exc)) from None
    context.log.info(f"exported {checkpoint} to {summary['path']} ({summary['architecture']}, {summary['dtype']})")
    source = summary["source"]
    step = {"step": source["step"]} if source.get("step") is not None else {}
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(summary["path"]),
        "dtype": summary["dtype"],
        "architecture": summary["architecture"],
        "parameters": summary["parameters"],
        "size_mb": round(summary["bytes"] / 1e6, 1),
        "vocab_size": summary["vocab_size"],
        "layers": summary["layers"],
        "moe_layers": summary["moe_layers"],
        "hidden_size": summary["hidden_size"],
        "experts": summary["experts"],
        "top_k": summary["top_k"],
        "checkpoint": dg.MetadataValue.path(source["checkpoint"]),
        **step,
        "usage": dg.MetadataValue.md(usage_markdown(summary["path"])),
    })
