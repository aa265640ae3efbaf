"""Which checkpoints count: starting over another run, and rolling back to an older step."""

import json

import pytest

from blues_train.io.errors import BluesError
from blues_train.training import checkpoint


def fake_checkpoint(root, step: int):
    folder = root / checkpoint.step_name(step)
    (folder / checkpoint.DEEPSPEED_DIR / checkpoint.DEEPSPEED_TAG).mkdir(parents=True)
    (folder / checkpoint.MODEL_FILE).write_bytes(b"weights")
    (folder / checkpoint.META_FILE).write_text(json.dumps({"step": step}))
    return folder


def test_fresh_start_over_existing_checkpoints_is_refused(tmp_path):
    fake_checkpoint(tmp_path, 100)
    with pytest.raises(BluesError, match="--resume auto"):
        checkpoint.check_start(tmp_path, None, set_aside=True)
    checkpoint.check_start(tmp_path / "empty", None, set_aside=True)  # nothing there: fine


def test_rollback_sets_later_checkpoints_aside(tmp_path):
    older = fake_checkpoint(tmp_path, 50)
    for step in (100, 150):
        fake_checkpoint(tmp_path, step)
    checkpoint.check_start(tmp_path, older, set_aside=False)  # other ranks move nothing
    assert len(checkpoint.complete_checkpoints(tmp_path)) == 3
    checkpoint.check_start(tmp_path, older, set_aside=True)
    assert checkpoint.complete_checkpoints(tmp_path) == [older]
    assert checkpoint.resolve_resume("auto", tmp_path) == older
    aside = tmp_path / "abandoned-after-step-000050"
    assert sorted(p.name for p in aside.iterdir()) == ["step-000100", "step-000150"]


def test_half_written_checkpoint_does_not_count(tmp_path):
    fake_checkpoint(tmp_path, 10)
    torn = fake_checkpoint(tmp_path, 20)
    (torn / checkpoint.META_FILE).write_text('{"step": 2')
    assert checkpoint.resolve_resume("auto", tmp_path).name == "step-000010"
