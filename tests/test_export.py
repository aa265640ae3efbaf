"""`blues export`: the Hugging Face folder computes what Blues computes (CPU, float32), its
tokenizer is tiktoken's o200k_base, it loads offline with no custom code, and the
hf_model asset records it.

Models: the tiny preset (through a checkpoint folder and the command line), and random
models with every Blues-01 dimension but fewer layers (2 instead of 12: one dense and one
MoE layer, or two MoE layers for the every-layer-MoE variant), so the test stays fast.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import torch
import transformers
from reference import NETWORK_OFF
from safetensors import safe_open
from safetensors.torch import save_file

from blues_model import BluesConfig, BluesLM
from blues_model.generation import generate
from blues_train.cli import main as blues_main
from blues_train.data import tokenizer
from blues_train.data.sources import SkipLog, discover_sources, iter_documents
from blues_train.io.errors import BluesError
from blues_train.serving import export
from blues_train.training import checkpoint

BLUES = str(Path(sys.executable).parent / "blues")
TOLERANCE = 1e-4  # max |logit difference|, float32
MODELS = {
    # init_std 0.2 makes a random model's greedy continuation vary instead of repeating a token
    "tiny": dict(BluesConfig.preset("tiny").to_dict(), init_std=0.2),
    "blues-01-shaped": dict(n_layers=2),
    "blues-01-shaped-every-layer-moe": dict(n_layers=2, moe_every=1),
}
ARCHITECTURES = {"tiny": "Qwen2MoeForCausalLM", "blues-01-shaped": "Qwen2MoeForCausalLM",
                 "blues-01-shaped-every-layer-moe": "MixtralForCausalLM"}


def random_model(name: str, seed: int = 0) -> BluesLM:
    torch.manual_seed(seed)
    model = BluesLM(BluesConfig(**MODELS[name])).eval()
    with torch.no_grad():  # norm weights other than one, so a misplaced norm shows
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.uniform_(0.5, 1.5)
    return model


def save_checkpoint(model: BluesLM, folder: Path, step: int = 7) -> Path:
    """A checkpoint folder as blues train leaves it, for load_model: weights, config, meta.json."""
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / checkpoint.MODEL_FILE),
              metadata={"format": "pt"})
    (folder / checkpoint.CONFIG_FILE).write_text(json.dumps(model.config.to_dict()))
    meta = {"format_version": checkpoint.FORMAT_VERSION, "step": step, "files": checkpoint.file_hashes(folder)}
    (folder / checkpoint.META_FILE).write_text(json.dumps(meta))
    return folder


def load_hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    model = random_model("tiny")
    return model, save_checkpoint(model, tmp_path_factory.mktemp("run") / "checkpoints" / "step-000007")


@pytest.fixture(scope="module")
def tiny_export(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported by `blues export` (in process), float32."""
    out = tmp_path_factory.mktemp("exports") / "tiny"
    assert blues_main(["export", "--checkpoint", str(tiny_checkpoint[1]), "--out", str(out),
                       "--dtype", "float32"]) == 0
    return out


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tiny_export, tmp_path_factory):
    """name -> (Blues model, its exported folder)."""
    def models():
        yield "tiny", tiny_checkpoint[0], tiny_export
        for name in ("blues-01-shaped", "blues-01-shaped-every-layer-moe"):
            model = random_model(name)
            out = tmp_path_factory.mktemp("exports") / name
            export.write_export(model, out, "float32")
            yield name, model, out
    return {name: (model, out) for name, model, out in models()}


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_export):
    return transformers.AutoTokenizer.from_pretrained(tiny_export, local_files_only=True)


@pytest.mark.parametrize("name", MODELS)
def test_logits_equal_blues(exported, name):
    model, folder = exported[name]
    hf = load_hf(folder)
    assert type(hf).__name__ == ARCHITECTURES[name] and hf.dtype == torch.float32
    ids = torch.randint(0, tokenizer.N_VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert theirs.shape == ours.shape == (2, 48, tokenizer.N_VOCAB)  # the real ids only, no padding
    difference = (ours - theirs).abs().max().item()
    print(f"{name}: max |logit difference| {difference:.2e}")
    assert difference < TOLERANCE


@pytest.mark.parametrize("name", MODELS)
def test_greedy_continuations_are_identical(exported, name):
    model, folder = exported[name]
    hf = load_hf(folder)
    prompts = [tokenizer.encode("def main("), tokenizer.encode("The quick brown fox jumps over")]
    ours = generate(model, prompts, 12, temperature=0, eos_id=None)
    longest = max(map(len, prompts))
    ids = torch.full((2, longest), tokenizer.EOT_ID)
    mask = torch.zeros(2, longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding, as Blues batches prompts
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    hf.generation_config.eos_token_id = None  # as eos_id=None: never stop early
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert out[:, longest:].tolist() == ours and all(len(row) == 12 for row in ours)
    if name == "tiny":
        assert len(set(ours[0])) > 3  # a continuation, not one token repeated


def test_folder_is_plain_transformers(tiny_export):
    _, loading = transformers.AutoModelForCausalLM.from_pretrained(tiny_export, local_files_only=True,
                                                                   output_loading_info=True)
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched weights
    names = sorted(p.name for p in tiny_export.iterdir())
    assert names == ["README.md", "blues_export.json", "config.json", "generation_config.json", "model.safetensors",
                     "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tiny_export / "config.json").read_text())
    assert config["transformers_version"] == transformers.__version__  # as save_pretrained writes it
    assert "auto_map" not in config and config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert config["vocab_size"] == tokenizer.N_VOCAB and config["eos_token_id"] == tokenizer.EOT_ID
    assert config["decoder_sparse_step"] == 2 and config["norm_topk_prob"] and config["tie_word_embeddings"]
    with safe_open(str(tiny_export / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [tokenizer.N_VOCAB, 64]
        assert "lm_head.weight" not in f.keys()  # tied to the embedding
        for name in f.keys():
            if "shared_expert" in name:
                assert not f.get_tensor(name).any()
    summary = json.loads((tiny_export / "blues_export.json").read_text())
    assert summary["source"]["step"] == 7 and summary["architecture"] == "Qwen2MoeForCausalLM"
    assert summary["dtype"] == "float32" and summary["vocab_size"] == tokenizer.N_VOCAB


def test_loading_gives_no_tokenizer_regex_warning(tiny_export, capfd):
    """Without `transformers_version` in config.json, transformers 5 takes o200k_base for a
    Mistral tokenizer and warns of "an incorrect regex pattern"."""
    capfd.readouterr()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_export, local_files_only=True)
    load_hf(tiny_export)
    assert "regex" not in capfd.readouterr().err
    assert not getattr(hf_tokenizer, "fix_mistral_regex", False)


def test_model_card_tells_the_models_story(reference, mixture_dir, tmp_path, capsys):
    """The card of a trained run's export: architecture, the mixture, each token store and
    every raw file's sha256, tokens seen, held-out loss, and how to load it."""
    out = tmp_path / "hf"
    assert blues_main(["export", "--checkpoint", str(reference), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    folder = checkpoint.complete_checkpoints(reference / "checkpoints")[-1]
    meta = checkpoint.read_meta(folder)
    mixture = json.loads((mixture_dir / "mixture.json").read_text())
    assert "# Blues model (Qwen2MoeForCausalLM)" in card and "parameters" in card
    assert f"tokens seen: {meta['tokens']:,}" in card and f"steps: {meta['step']}" in card
    assert f"fingerprint `{mixture['fingerprint']}`" in card
    for source in mixture["sources"]:
        assert f"`{source['fingerprint']}`" in card
        for raw in json.loads((Path(source["path"]) / "manifest.json").read_text())["sources"]:
            assert f"`{raw['sha256']}`" in card
    assert f"held-out loss: {meta['val_loss']:.4f}" in card and "perplexity" in card
    assert f"AutoModelForCausalLM.from_pretrained({str(out)!r})" in card
    training = json.loads((out / "blues_export.json").read_text())["source"]["training"]
    assert training["mixture"]["fingerprint"] == mixture["fingerprint"] and len(training["stores"]) == 2


def corpus_texts(inputs) -> list[str]:
    sources = discover_sources(inputs["code"]) + discover_sources(inputs["prose"], glob="**/*")
    return [doc.text for doc in iter_documents(sources, "text", SkipLog())]


def test_tokenizer_ids_equal_tiktoken(hf_tokenizer, sample_corpus_inputs, reference_encoding):
    texts = corpus_texts(sample_corpus_inputs) + ["héllo wörld ✓ 漢字 🙂", "\x00\r\n\t  ", "a" * 5000]
    assert len(texts) > 100
    ids = hf_tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    for text, got in zip(texts, ids):
        assert got == reference_encoding.encode_ordinary(text)
        assert hf_tokenizer.decode(got) == text


def test_special_tokens(hf_tokenizer, reference_encoding):
    assert hf_tokenizer.eos_token == "<|endoftext|>" and hf_tokenizer.eos_token_id == tokenizer.EOT_ID
    assert hf_tokenizer.convert_tokens_to_ids("<|endofprompt|>") == tokenizer.EOP_ID
    assert hf_tokenizer.bos_token is None
    text = "a <|endoftext|> b <|endofprompt|> c"
    special = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.EOT_ID in special and tokenizer.EOP_ID in special  # Hugging Face's default
    ordinary = hf_tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ordinary == reference_encoding.encode_ordinary(text) == tokenizer.encode(text)
    assert hf_tokenizer.decode([tokenizer.EOT_ID]) == "<|endoftext|>"


OFFLINE_SCRIPT = NETWORK_OFF + """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
ids = tok("def main(", add_special_tokens=False)["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0, -1]
print(json.dumps({"ids": ids, "argmax": int(logits.argmax()), "class": type(model).__name__}))
"""


def test_loads_offline_with_network_disabled(tiny_checkpoint, tiny_export, tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(tiny_export)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ids = tokenizer.encode("def main(")
    with torch.no_grad():
        expected = int(tiny_checkpoint[0](torch.tensor([ids])).logits[0, -1].argmax())
    assert result == {"ids": ids, "argmax": expected, "class": "Qwen2MoeForCausalLM"}


def test_bfloat16_export(tiny_checkpoint, tiny_export, tmp_path):
    out = tmp_path / "bf16"
    summary = export.export(tiny_checkpoint[1], out)  # bfloat16 is the default
    assert summary["dtype"] == "bfloat16" and json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as bf16, \
            safe_open(str(tiny_export / "model.safetensors"), framework="pt") as fp32:
        assert sorted(bf16.keys()) == sorted(fp32.keys())
        for name in bf16.keys():
            assert torch.equal(bf16.get_tensor(name), fp32.get_tensor(name).to(torch.bfloat16))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype="auto")
    assert hf.dtype == torch.bfloat16


def test_export_replaces_an_earlier_export_and_leaves_no_temporary(tiny_checkpoint, tmp_path):
    out = tmp_path / "hf"
    export.export(tiny_checkpoint[1], out, "float32")
    (out / "config.json").write_text("{}")  # an earlier export, changed since
    export.export(tiny_checkpoint[1], out, "float32")
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_moe"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_failed_write_leaves_the_earlier_export(tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    export.export(tiny_checkpoint[1], out, "float32")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".json"}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export, "save_file", disk_full)
    with pytest.raises(BluesError, match=r"^no space left on device while writing the export .*\.tmp-hf"):
        export.export(tiny_checkpoint[1], out, "float32")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".json"} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    with pytest.raises(BluesError, match="^no space left"):
        export.export(tiny_checkpoint[1], tmp_path / "new", "float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_errors_are_one_line(tiny_checkpoint, tmp_path, capsys):
    folder = tiny_checkpoint[1]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    (tmp_path / "file").write_text("x")
    cases = {
        (str(folder), str(tmp_path / "notes")): "is not a folder blues export wrote",
        (str(folder), str(tmp_path / "file")): "is a file, not a folder",
        (str(folder), str(folder / "hf")): "inside the checkpoint",
    }
    for (source, out), message in cases.items():
        assert blues_main(["export", "--checkpoint", source, "--out", out]) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    result = subprocess.run([BLUES, "export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "a")],
                            capture_output=True, text=True, timeout=120)  # the console script itself
    assert result.returncode == 2 and result.stderr.startswith("error: --checkpoint ")
    assert "no such folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "a").exists()


def test_changed_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    copy = tmp_path / "step-000007"
    copy.mkdir()
    for name in (checkpoint.MODEL_FILE, checkpoint.CONFIG_FILE, checkpoint.META_FILE):
        (copy / name).write_bytes((tiny_checkpoint[1] / name).read_bytes())
    config = json.loads((copy / checkpoint.CONFIG_FILE).read_text())
    (copy / checkpoint.CONFIG_FILE).write_text(json.dumps({**config, "rope_base": 500000.0}))
    with pytest.raises(BluesError, match="changed since the checkpoint was saved"):
        export.export(copy, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_hf_model_asset(tiny_checkpoint, tmp_path):
    from pipelines import export_assets
    from pipelines.assets import trained_model

    folder = tiny_checkpoint[1]
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization(
            trained_model.key, metadata={"checkpoint": dg.MetadataValue.path(str(folder))}))
        result = dg.materialize(
            [export_assets.hf_model], instance=instance,
            run_config={"ops": {"hf_model": {"config": {"dtype": "float32"}}}})
        assert result.success
        [event] = result.get_asset_materialization_events()
        metadata = {k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()}
    expected = folder.parents[1] / "hf" / "step-000007"
    assert metadata["path"] == str(expected) and (expected / "model.safetensors").is_file()
    assert metadata["dtype"] == "float32" and metadata["architecture"] == "Qwen2MoeForCausalLM"
    assert metadata["vocab_size"] == tokenizer.N_VOCAB and metadata["layers"] == 4 and metadata["step"] == 7
    assert metadata["parameters"] > 0 and metadata["size_mb"] > 0 and "vllm serve" in metadata["usage"]


def test_hf_model_is_in_the_code_location(tmp_path):
    from blues_project import write_project

    from pipelines.config import load_project_config
    from pipelines.definitions import build_definitions

    graph = build_definitions(load_project_config(write_project(tmp_path, corpus_mb=0.02))).resolve_asset_graph()
    assert graph.get(dg.AssetKey("hf_model")).parent_keys == {dg.AssetKey("trained_model")}
