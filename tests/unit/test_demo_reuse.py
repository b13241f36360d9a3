"""The demo reuses a finished run only if this version can load its checkpoint."""

import json

from fashion_search.demo import load_finished_run
from fashion_search.models.checkpoint import atomic_torch_save, model_payload


def _finished_run(directory, payload):
    run = directory / "run"
    run.mkdir(parents=True)
    (run / "history.json").write_text(json.dumps({"finished": True, "epochs": []}))
    atomic_torch_save(payload, run / "checkpoint.pt")
    (directory / "index").mkdir()
    (directory / "index" / "CURRENT").write_text("1")


def test_a_loadable_finished_run_is_reused(tmp_path, micro_model):
    _finished_run(tmp_path, model_payload(micro_model))
    model = load_finished_run(tmp_path)
    assert model is not None and model.dim == micro_model.dim
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def test_an_unfinished_run_is_not_reused(tmp_path, micro_model):
    _finished_run(tmp_path, model_payload(micro_model))
    (tmp_path / "run" / "history.json").write_text(json.dumps({"finished": False}))
    assert load_finished_run(tmp_path) is None
    assert (tmp_path / "run").exists()  # left for --resume


def test_a_run_of_an_older_architecture_is_moved_aside_not_deleted(tmp_path, micro_model, capsys):
    payload = model_payload(micro_model)
    key = "backbone.clip.positional_embedding"
    payload["state_dict"][key] = payload["state_dict"][key][:8].clone()  # an older, shorter text context
    _finished_run(tmp_path, payload)
    assert load_finished_run(tmp_path) is None
    assert not (tmp_path / "run").exists() and not (tmp_path / "index").exists()
    (old_run,) = tmp_path.glob("run.old-*")
    (old_index,) = tmp_path.glob("index.old-*")
    assert (old_run / "checkpoint.pt").exists() and (old_index / "CURRENT").exists()
    assert "training again" in capsys.readouterr().out
