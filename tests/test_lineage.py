"""`blues lineage` against what training really drew, and spike records.

The truth a report is checked against never comes from the lineage code: the windows
training drew (its BLUES_WINDOW_DUMP hook, every rank) or a second pass of the loader, and
each document's tokens read row by row from the store's Arrow chunks. Runs:
    reference, two_ranks   the shared 8-step runs (tests/training_runs.py)
    planted                one rank, 12 steps, on plain text plus one document of random
                           characters that the mixture places around steps 9-11: a spike
    resumed                `planted` resumed from step 6 on two ranks
    quiet                  `planted` resumed from step 6 on one rank with --spike_factor 0
"""

from __future__ import annotations

import json
import random
import string
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from reference import take
from training_runs import BIN, ROOT, TRAIN_ARGS, checked, env, free_port, losses, records

from blues_train.data.prepare import prepare_dataset
from blues_train.data.store import read_manifest
from blues_train.data.tokenizer import EOT_ID
from blues_train.io.command_line import run_command
from blues_train.io.errors import BluesError
from blues_train.mixture.loader import PackedSequenceDataset, WindowPiece
from blues_train.mixture.merge import merge
from blues_train.mixture.plan_cache import FORMAT_VERSION
from blues_train.mixture.spec import held_out
from blues_train.serving import lineage
from blues_train.training.metrics import SpikeDetector, document_losses

SEQ_LEN = 32
NOISE = "noise.txt:0"
PLANTED_STEPS = 12
# The tiny preset: what these tests see (spikes, the noise document ranked first) is learned.
PLANTED_ARGS = [*TRAIN_ARGS, "--model", "tiny", "--max_steps", str(PLANTED_STEPS), "--lr", "3e-2",
                "--eval_interval", "12", "--save_interval", "6", "--keep_last", "3", "--spike_window", "3"]


def report(capsys, *argv) -> dict:
    assert lineage.main([*map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def store_documents(*stores) -> dict:
    """{(store folder, raw file, index): tokens} of every row of the stores' chunks."""
    docs = {}
    for folder in stores:
        for chunk in read_manifest(folder)["chunks"]:
            with pa.memory_map(str(folder / chunk["file"])) as f:
                for row in pa.ipc.open_file(f).read_all().to_pylist():
                    docs[(str(folder), row["source"], row["index"])] = row["tokens"]
    return docs


def check_window(tokens: list[int], pieces: list[dict], docs: dict) -> None:
    """The pieces are exactly the window: each the named document's tokens at the named
    offsets, one EOT between consecutive pieces, EOT nowhere else."""
    assert len(tokens) == SEQ_LEN + 1
    covered = np.zeros(len(tokens), bool)
    for before, after in zip(pieces, pieces[1:]):
        assert after["window_tokens"][0] == before["window_tokens"][1] + 1
    for p in pieces:
        doc = docs[(p["dataset"], p["source"], p["index"])]
        (a, b), (da, db) = p["window_tokens"], p["doc_tokens"]
        assert p["doc_length"] == len(doc) and b - a == db - da > 0
        assert tokens[a:b] == doc[da:db]
        covered[a:b] = True
    assert [t == EOT_ID for t in tokens] == (~covered).tolist()


def dumped(prefix, world_size: int) -> dict:
    """{(step, rank): [windows]} as training drew them; a resumed run's later lines win."""
    out = {}
    for rank in range(world_size):
        for line in open(f"{prefix}.rank{rank}"):
            entry = json.loads(line)
            out[(entry["step"], entry["rank"])] = entry["windows"]
    return out


def check_against_dump(capsys, run, dump: dict, docs: dict, steps, world_size: int) -> dict:
    reports = {}
    for step in steps:
        rep = report(capsys, "--run", run, "--step", step)
        assert rep["layout"] == {"world_size": world_size, "micro_batch": 1, "grad_accum": 4 // world_size}
        assert [w["window"] for w in rep["windows"]] == list(range(4 * (step - 1), 4 * step))
        for w in rep["windows"]:
            assert (w["rank"], w["row"]) == ((w["window"] % 4) % world_size, 0)
            check_window(dump[(step, w["rank"])][w["micro_batch"]], w["pieces"], docs)
        reports[step] = rep
    return reports


# ---- the shared runs: one rank and two, against a second pass of the loader ----

@pytest.mark.slow
def test_step_lineage_is_exact_on_one_and_two_ranks(capsys, reference, two_rank_run, mixture_dir):
    sources = [s["path"] for s in json.loads((mixture_dir / "mixture.json").read_text())["sources"]]
    docs = store_documents(*map(Path, sources))
    single = [w.tolist() for w in take(PackedSequenceDataset(mixture_dir, SEQ_LEN), 32)]
    shards = [[w.tolist() for w in take(PackedSequenceDataset(mixture_dir, SEQ_LEN, rank=r, world_size=2), 16)]
              for r in range(2)]
    for step in (1, 5, 8):
        one = report(capsys, "--run", reference, "--step", step)
        two = report(capsys, "--run", two_rank_run[0], "--step", step)
        assert one["window_range"] == two["window_range"] == [4 * (step - 1), 4 * step]
        assert one["layout"] == {"world_size": 1, "micro_batch": 1, "grad_accum": 4}
        assert two["layout"] == {"world_size": 2, "micro_batch": 1, "grad_accum": 2}
        assert [w["pieces"] for w in one["windows"]] == [w["pieces"] for w in two["windows"]]
        for a, b in zip(one["windows"], two["windows"]):
            g = a["window"]
            assert (a["rank"], a["micro_batch"]) == (0, g % 4)
            assert (b["rank"], b["micro_batch"]) == (g % 2, (g % 4) // 2)
            check_window(single[g], a["pieces"], docs)
            check_window(shards[g % 2][g // 2], b["pieces"], docs)


def test_index_cache_dir_is_where_lineage_reads_its_tables(capsys, tmp_path, reference):
    """--index_cache_dir means what it means to the loader and train: the tables are built
    there once (then read, not rebuilt) and the answers are the same."""
    step = report(capsys, "--run", reference, "--step", 5)
    assert report(capsys, "--run", reference, "--step", 5, "--index_cache_dir", tmp_path) == step
    [folder] = tmp_path.glob(f"v{FORMAT_VERSION}-*")
    tables = sorted(p.name for p in folder.glob("*.npy"))
    assert {"documents-train.npy", "plan-train-seed0-pass0.npy"} <= set(tables)
    written = {name: (folder / name).stat().st_ino for name in tables}
    doc = step["windows"][0]["pieces"][0]
    spec = f"{doc['source']}:{doc['index']}"
    assert (report(capsys, "--run", reference, "--document", spec, "--index_cache_dir", tmp_path)
            == report(capsys, "--run", reference, "--document", spec))
    assert {name: (folder / name).stat().st_ino for name in tables} == written  # read, not rebuilt


# ---- the planted run ----

@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A mixture of plain text (four words) and one document of random characters, placed by
    its share in the middle of the pass, and a 12-step run on it with its windows dumped."""
    root = tmp_path_factory.mktemp("planted")
    rng = random.Random(0)
    with open(root / "plain.jsonl", "w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": " ".join(rng.choice(["the", "cat", "sat", "on"]) for _ in range(30))}) + "\n")
    (root / "noise").mkdir()
    alphabet = string.ascii_letters + string.digits + string.punctuation
    noise_rng = random.Random(1)
    (root / "noise" / "noise.txt").write_text("".join(noise_rng.choice(alphabet) for _ in range(390)))
    stores = root / "plain_store", root / "noise_store"
    prepare_dataset([root / "plain.jsonl"], stores[0], workers=1, progress=False)
    prepare_dataset([root / "noise" / "noise.txt"], stores[1], workers=1, progress=False)
    manifest = read_manifest(stores[1])
    noise_tokens = manifest["totals"]["tokens"]
    assert not held_out(manifest["sources"][0]["sha256"], [0], 0.05)[0]
    total = 2412  # the noise document's middle sorts at the middle of the pass: around step 10
    merge(list(stores), root / "mixture", weights=[total - noise_tokens, noise_tokens], num_tokens=total,
          val_fraction=0.05)
    mixture = json.loads((root / "mixture" / "mixture.json").read_text())
    assert mixture["sources"][1]["tokens"] == noise_tokens  # the document exactly once per pass
    run = root / "run"
    train(root / "mixture", run, root / "dump")
    return {"root": root, "mixture": root / "mixture", "run": run, "dump": root / "dump", "stores": stores,
            "docs": store_documents(*stores), "noise": manifest}


def train(mixture, out, dump, *extra, ranks: int = 1) -> None:
    """A planted-mixture run on 1 rank, or 2 (DeepSpeed's launcher), its windows dumped to `dump`."""
    launcher = ([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", free_port(), "--module"]
                if ranks == 2 else [str(BIN / "python"), "-m"])
    cmd = [*launcher, "blues_train.training.train", "--data_cache_dir", str(mixture), "--out", str(out), *PLANTED_ARGS, *extra]
    checked(subprocess.run(cmd, cwd=ROOT, env={**env(ranks), "BLUES_WINDOW_DUMP": str(dump)},
                           capture_output=True, text=True, timeout=600))


@pytest.fixture(scope="module")
def resumed(planted):
    """`planted` resumed from step 6 on two ranks."""
    out = planted["root"] / "resumed"
    train(planted["mixture"], out, planted["root"] / "resumed_dump", "--resume",
          str(planted["run"] / "checkpoints" / "step-000006"), ranks=2)
    return out


def noise_steps(planted) -> dict[int, set[int]]:
    """{step: windows} that hold noise tokens, found by searching the dumped stream for the
    noise document's tokens (no lineage code involved)."""
    dump = dumped(planted["dump"], 1)
    windows = [w for step in range(1, PLANTED_STEPS + 1) for w in dump[(step, 0)]]
    stream = windows[0] + [t for w in windows[1:] for t in w[1:]]
    noise = planted["docs"][(str(planted["stores"][1]), "noise.txt", 0)]
    starts = [p for p in range(len(stream) - len(noise) + 1) if stream[p:p + len(noise)] == noise]
    assert len(starts) == 1 and stream[starts[0] - 1] == EOT_ID == stream[starts[0] + len(noise)]
    held = {}
    for g in range(len(windows)):
        if set(range(g * SEQ_LEN, g * SEQ_LEN + SEQ_LEN + 1)) & set(range(starts[0], starts[0] + len(noise))):
            held.setdefault(g // 4 + 1, set()).add(g)
    return held


@pytest.mark.slow
def test_planted_run_lineage_is_what_training_drew(capsys, planted):
    check_against_dump(capsys, planted["run"], dumped(planted["dump"], 1), planted["docs"],
                       range(1, PLANTED_STEPS + 1), world_size=1)


@pytest.mark.slow
def test_document_finds_every_step_it_was_in(capsys, planted):
    expected = noise_steps(planted)
    assert min(expected) > 6 and max(expected) < PLANTED_STEPS  # the planted block is inside the run
    rep = report(capsys, "--run", planted["run"], "--document", NOISE)
    assert rep["steps"] == sorted(expected) and rep["epochs"] == [0]
    assert {a["window"] for a in rep["appearances"]} == set().union(*expected.values())
    assert rep["document"]["tokens"] == planted["noise"]["totals"]["tokens"]
    # every token of the document, as the label or input of some window
    covered = set().union(*(range(*a["doc_tokens"]) for a in rep["appearances"]))
    assert covered == set(range(rep["document"]["tokens"]))
    sha = planted["noise"]["sources"][0]["sha256"]
    assert report(capsys, "--run", planted["run"], "--document", f"{sha[:12]}:0")["steps"] == rep["steps"]
    first = report(capsys, "--run", planted["run"], "--step", 1)["windows"][0]["pieces"][0]
    plain = report(capsys, "--run", planted["run"], "--document", f"{first['source']}:{first['index']}")
    assert plain["steps"][0] == 1 and plain["recorded_steps"] == [1, PLANTED_STEPS]
    dump = dumped(planted["dump"], 1)
    doc = planted["docs"][(first["dataset"], first["source"], first["index"])]
    for a in plain["appearances"]:
        window = dump[(a["step"], 0)][a["micro_batch"]]
        assert window[slice(*a["window_tokens"])] == doc[slice(*a["doc_tokens"])]


@pytest.mark.slow
def test_loss_ranks_the_random_document_first(capsys, planted):
    mixed = [step for step, windows in noise_steps(planted).items() if len(windows) < 4]
    assert mixed
    for step in mixed:
        for checkpoint in ("step-000006", "step-000012"):  # before the model saw it, and after
            rep = report(capsys, "--run", planted["run"], "--step", step, "--loss", "--checkpoint",
                         planted["run"] / "checkpoints" / checkpoint)
            docs = rep["documents"]
            assert len(docs) > 1 and docs[0]["source"] == "noise.txt" and docs[0]["index"] == 0
            assert docs[0]["mean_loss"] > 2 * max(d["mean_loss"] for d in docs[1:])
            assert sum(d["tokens"] for d in docs) == 4 * SEQ_LEN  # every label counted once


@pytest.mark.slow
def test_spike_is_recorded_with_its_documents(capsys, planted):
    expected = noise_steps(planted)
    spikes = {r["step"]: r["spike"] for r in records(planted["run"]) if "spike" in r}
    assert spikes and set(spikes) <= set(expected), (sorted(spikes), sorted(expected))
    for step, spike in spikes.items():
        assert spike["ratio"] > spike["factor"] == 1.5 and spike["steps"] == 3
        assert spike["documents"][0]["source"] == "noise.txt"
        assert spike["documents"][0]["sha256"] == planted["noise"]["sources"][0]["sha256"]
        assert sum(d["tokens"] for d in spike["documents"]) <= 4 * SEQ_LEN
    rows = lineage.spike_rows(planted["run"], planted["run"] / "checkpoints" / "step-000012")
    assert [r["step"] for r in rows] == sorted(spikes)
    assert rows[0]["top_documents"].startswith("noise_store noise.txt:0 (mean loss")
    assert rows[0]["explain"].startswith(f"blues lineage --run {planted['run']} --step {rows[0]['step']} --loss")
    assert lineage.main(["--run", str(planted["run"]), "--spikes"]) == 0
    assert "noise.txt:0" in capsys.readouterr().out


@pytest.mark.slow
def test_resumed_on_two_ranks_keeps_lineage_and_spikes(capsys, planted, resumed):
    dump = dumped(planted["root"] / "resumed_dump", 2)
    assert sorted({step for step, _ in dump}) == list(range(7, PLANTED_STEPS + 1))
    after = check_against_dump(capsys, resumed, dump, planted["docs"], range(7, PLANTED_STEPS + 1), world_size=2)
    before = {step: report(capsys, "--run", planted["run"], "--step", step) for step in after}
    for step in after:
        assert [w["pieces"] for w in after[step]["windows"]] == [w["pieces"] for w in before[step]["windows"]]
    spikes = [r["step"] for r in records(resumed) if "spike" in r]
    assert spikes == [r["step"] for r in records(planted["run"]) if "spike" in r and r["step"] > 6]
    rep = report(capsys, "--run", resumed, "--document", NOISE)
    assert rep["steps"] == [s for s in sorted(noise_steps(planted)) if s > 6]
    assert all(a["rank"] == (a["window"] % 4) % 2 for a in rep["appearances"])


@pytest.mark.slow
def test_spike_detection_leaves_the_losses_alone(planted):
    """Spikes cost an extra forward; the steps after them are those of a run without it."""
    out = planted["root"] / "quiet"
    train(planted["mixture"], out, planted["root"] / "quiet_dump", "--resume",
          str(planted["run"] / "checkpoints" / "step-000006"), "--spike_factor", "0")
    assert not [r for r in records(out) if "spike" in r]
    assert losses(out) == {s: v for s, v in losses(planted["run"]).items() if s > 6}


# ---- errors and the pieces of the rule, without training ----

@pytest.mark.slow
def test_errors_are_one_line(tmp_path, reference, capsys):
    """The first case through `blues lineage`, the others through the same entry point in
    process (run_command: what the console script calls), without a start-up each."""
    cases = [
        (["--run", str(tmp_path), "--step", "1"], "metrics.jsonl: no metrics"),
        (["--run", str(reference), "--step", "99"], "--step 99: "),
        (["--run", str(reference), "--step", "1", "--loss"], "--loss needs --checkpoint"),
        (["--run", str(reference), "--document", "nocolon"], "give SOURCE:INDEX"),
        (["--run", str(reference), "--document", "nosuchfile.txt:0"], "no raw file of that name"),
    ]
    for i, (argv, message) in enumerate(cases):
        if i == 0:
            result = subprocess.run([str(BIN / "blues"), "lineage", *argv], capture_output=True, text=True, cwd=ROOT)
            code, out, err = result.returncode, result.stdout, result.stderr
        else:
            code = run_command(lineage.main, argv)
            out, err = capsys.readouterr()
        assert code == 2 and out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_spike_rule():
    spikes = SpikeDetector(1.5, 4)
    flagged = [spikes.observe(loss) for loss in [10, 9, 30, 8, 7, 6, 5, 12, float("nan"), 4.9, 4.8]]
    # 30 comes before 4 losses are known; 12 > 1.5 x median(8, 7, 6, 5) = 9.75
    assert flagged == [None] * 7 + [6.5, None, None, None]
    assert list(spikes.history) == [5, 12, 4.9, 4.8]
    resumed = SpikeDetector(1.5, 4, history=[10, 9, 30, 8, 7, 6, 5])
    assert resumed.observe(12) == 6.5
    assert SpikeDetector(0, 4, history=[1, 1, 1, 1]).observe(100) is None


def test_document_losses_attribute_each_label_once():
    # window: doc A tokens 0-2, EOT, doc B tokens 4-5 (seq_len 5: six tokens, five labels)
    a = WindowPiece(0, 0, 1, 10, 13, 40, 0, 3)
    b = WindowPiece(1, 2, 0, 0, 2, 2, 4, 6)
    docs = document_losses([([a, b], [1.0, 2.0, 3.0, 8.0, 4.0])])
    # labels 1, 2 are A's tokens, label 3 (EOT) ends A, labels 4, 5 are B's
    assert docs == [{"document": (1, 2, 0), "tokens": 2, "mean_loss": 6.0, "max_loss": 8.0},
                    {"document": (0, 0, 1), "tokens": 3, "mean_loss": 2.0, "max_loss": 3.0}]


def test_window_pieces_across_a_pass_boundary(mixture_dir):
    """Windows that straddle the end of pass 0 against the loader's own stream, and a
    document's windows back from them."""
    stream = PackedSequenceDataset(mixture_dir, 512)
    n = stream.num_windows(0)
    windows = take(PackedSequenceDataset(mixture_dir, 512), n + 3)
    sources = [s["path"] for s in stream.mixture["sources"]]
    docs = store_documents(*map(Path, sources))
    for g in (0, n - 2, n - 1, n, n + 1, n + 2):
        pieces = stream.window_pieces(g)
        names = stream.document_ids(pieces)
        as_json = [{**name.to_dict(), "doc_tokens": [p.doc_start, p.doc_end], "doc_length": p.doc_length,
                    "window_tokens": [p.window_start, p.window_end]} for p, name in zip(pieces, names)]
        tokens = windows[g].tolist()
        covered = np.zeros(513, bool)
        for p in as_json:
            doc = docs[(p["dataset"], p["source"], p["index"])]
            assert tokens[slice(*p["window_tokens"])] == doc[slice(*p["doc_tokens"])]
            covered[slice(*p["window_tokens"])] = True
        assert [t == EOT_ID for t in tokens] == (~covered).tolist()
        assert np.array_equal(stream.window_tokens(g), windows[g].numpy())
    piece = stream.window_pieces(n)[0]
    hits = stream.document_windows(piece.document, n + 3)
    assert any(h.window == n and (h.doc_start, h.window_start) == (piece.doc_start, piece.window_start) for h in hits)
    for h in hits:
        doc = docs[tuple(stream.document_ids([piece.document])[0].to_dict()[k] for k in ("dataset", "source", "index"))]
        assert windows[h.window].tolist()[h.window_start:h.window_end] == doc[h.doc_start:h.doc_end]
    with pytest.raises(BluesError, match="no raw file"):
        stream.find_document("no/such.txt", 0)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::dagster.PreviewWarning")  # raised inside Dagster Pipes
def test_trained_model_shows_the_spikes(planted):
    """The planted run's second half once more, launched by the trained_model asset (resumed
    from its step-6 checkpoint; the spikes are after step 6): its metadata lists the spikes
    training recorded, each with its worst documents."""
    import dagster as dg

    from pipelines import assets
    from pipelines.resources import BluesProject

    root = planted["root"]
    training = {"model": "tiny", "max_steps": PLANTED_STEPS, "seq_len": SEQ_LEN, "global_batch_tokens": 128,
                "micro_batch": 1, "lr": 3e-2, "eval_interval": PLANTED_STEPS, "save_interval": PLANTED_STEPS,
                "spike_window": 3, "out": "dagster_runs",
                "args": ["--eval_sequences", "4", "--resume", str(planted["run"] / "checkpoints" / "step-000006")]}
    mixture = json.loads((planted["mixture"] / "mixture.json").read_text())
    config = {"datasets": {"paths": ["plain_store", "noise_store"], "merge_strategy": "weighted",
                           "weights": [s["weight"] for s in mixture["sources"]]},
              "sources": [{"name": "plain", "input": "plain.jsonl"},
                          {"name": "noise", "input": "noise", "glob": "**/*.txt"}],
              "mixture": {"output": "mixture", "val_fraction": 0.05, "num_tokens": mixture["total_tokens"]},
              "training": training}
    (root / "config.json").write_text(json.dumps(config))
    resources = {"project": BluesProject(config_path=str(root / "config.json")), "pipes": dg.PipesSubprocessClient()}
    with dg.instance_for_test() as instance:
        result = dg.materialize([assets.trained_model, assets.model_checkpoint], selection=[assets.trained_model],
                                instance=instance, resources=resources)
        assert result.success
        [event] = [e for e in result.get_asset_materialization_events()
                   if e.asset_key == assets.trained_model.key]
        shown = event.step_materialization_data.materialization.metadata
    [run] = (root / "dagster_runs").iterdir()
    expected = [r["step"] for r in records(planted["run"]) if "spike" in r]
    assert min(expected) > 6 and records(run)[0]["step"] == 7
    assert shown["spike_count"].value == len(expected) > 0
    rows = [record.data for record in shown["spikes"].value.records]
    assert [row["step"] for row in rows] == expected
    assert rows == lineage.spike_rows(run, Path(shown["checkpoint"].value))
    assert rows[0]["top_documents"].startswith("noise_store noise.txt:0")
