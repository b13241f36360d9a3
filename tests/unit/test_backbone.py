"""The OpenCLIP wrapper: compact configs, encoders, offline fail-fast, device choice."""

import time

import pytest
import torch
from PIL import Image

from fashion_search.errors import FashionSearchError, PretrainedUnavailableError
from fashion_search.models import backbone
from fashion_search.models.backbone import list_models, resolve_device
from fashion_search.models.checkpoint import create_model


def test_compact_models_registered():
    assert {"fs-micro", "fs-tiny", "fs-rn-tiny", "ViT-B-32", "RN50"} <= set(list_models())


def test_encoders_are_normalised_and_batched(micro_model):
    imgs = [Image.new("RGB", (50 + i, 40), (i * 40, 10, 200)) for i in range(5)]
    emb = micro_model.encode_images(imgs, batch_size=2)
    assert emb.shape == (5, micro_model.dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-4)
    txt = micro_model.encode_texts(["is red", "has long sleeves", "darker"], batch_size=2)
    assert txt.shape == (3, micro_model.dim)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-4)


def test_long_text_is_truncated_not_refused(micro_model):
    emb = micro_model.encode_texts(["very long description " * 300])
    assert emb.shape == (1, micro_model.dim)


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_text_is_a_clear_error(micro_model, text):
    with pytest.raises(FashionSearchError, match="empty"):
        micro_model.encode_texts([text])


def test_offline_pretrained_tag_fails_fast(monkeypatch):
    monkeypatch.setattr(backbone, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(backbone, "_cached_weights", lambda *a: None)
    t0 = time.perf_counter()
    with pytest.raises(PretrainedUnavailableError, match="--pretrained"):
        create_model("ViT-B-32", "openai")
    assert time.perf_counter() - t0 < 10


def test_unknown_names_are_clear_errors(tmp_path):
    with pytest.raises(FashionSearchError, match="unknown model"):
        create_model("ViT-Z-99", "none")
    with pytest.raises(FashionSearchError, match="unknown pretrained tag"):
        create_model("fs-micro", "openai")
    with pytest.raises(FashionSearchError, match="not found"):
        create_model("fs-micro", str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("name", ["weights.pt", "weights.bin", "weights.safetensors"])
def test_a_corrupt_weights_file_is_a_one_line_error(tmp_path, name):
    """torch.load and safetensors raise IndexError, UnpicklingError, SafetensorError... on garbage."""
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(FashionSearchError, match="corrupt") as err:
        create_model("fs-micro", str(path))
    assert "\n" not in str(err.value)


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else None
    assert resolve_device(None).type in {expected, "mps", "cpu"}
    with pytest.raises(FashionSearchError):
        resolve_device("not-a-device")


def test_random_weights_are_the_same_in_every_process():
    # An index built with --pretrained none is queried by a later process: both must embed alike.
    torch.manual_seed(123)
    a = create_model("fs-micro", "none")
    after_a = torch.rand(1)
    torch.manual_seed(123)
    b = create_model("fs-micro", "none")
    assert torch.rand(1) == after_a  # the caller's random stream is untouched
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name


def test_building_a_model_leaves_the_gpus_random_state_alone(monkeypatch):
    # torch.manual_seed would reset every GPU's generator too (so training's --seed would not reach
    # dropout on a GPU), and fork_rng(devices=[]) would not put it back.
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", seeded.append)
    create_model("fs-micro", "none")
    assert seeded == []


def test_checkpoint_of_an_older_architecture_gets_a_clear_error(tmp_path, micro_model):
    from fashion_search.models.checkpoint import atomic_torch_save, load_checkpoint, model_payload

    payload = model_payload(micro_model)
    atomic_torch_save(payload, tmp_path / "ok.pt")
    assert load_checkpoint(tmp_path / "ok.pt").dim == micro_model.dim
    # As if trained when the config had a shorter text context (fs-tiny went from 24 to 40 tokens).
    key = "backbone.clip.positional_embedding"
    payload["state_dict"][key] = payload["state_dict"][key][:8].clone()
    atomic_torch_save(payload, tmp_path / "old.pt")
    with pytest.raises(FashionSearchError, match="does not fit the current fs-micro architecture.*retrain"):
        load_checkpoint(tmp_path / "old.pt")


def _count_real_inits(monkeypatch) -> list:
    """Calls of nn.Linear's initialiser on real memory (on the meta device it allocates and costs nothing)."""
    calls, original = [], torch.nn.init.kaiming_uniform_

    def counting(*args, **kwargs):
        if not (args[0] if args else kwargs["tensor"]).is_meta:
            calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", counting)
    return calls


def test_loading_a_checkpoint_skips_the_random_init_and_restores_every_weight(
    tmp_path, micro_model, monkeypatch
):
    from fashion_search.models.checkpoint import (
        atomic_torch_save,
        file_sha256,
        load_checkpoint,
        model_payload,
    )

    atomic_torch_save(model_payload(micro_model), tmp_path / "m.pt")
    calls = _count_real_inits(monkeypatch)
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert not calls  # no init ran on real memory: the checkpoint overwrites every weight anyway
    for (name, a), b in zip(micro_model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.checkpoint_sha256 == file_sha256(tmp_path / "m.pt")
    create_model("fs-micro", "none")
    assert calls  # random weights are still initialised


def test_a_checkpoint_missing_a_weight_is_refused_not_left_uninitialised(tmp_path, micro_model):
    from fashion_search.models.checkpoint import atomic_torch_save, load_checkpoint, model_payload

    payload = model_payload(micro_model)
    del payload["state_dict"]["backbone.clip.visual.conv1.weight"]
    atomic_torch_save(payload, tmp_path / "m.pt")
    with pytest.raises(FashionSearchError, match="does not fit.*conv1.weight"):
        load_checkpoint(tmp_path / "m.pt")


def test_a_load_rebuilds_the_buffers_the_weights_do_not_hold(tmp_path, micro_model):
    """The causal text mask is derived from the config, not saved: built on the meta device, the loaded
    model must compute it again, or text embeddings would come from uninitialised memory."""
    from fashion_search.models.checkpoint import atomic_torch_save, load_checkpoint, model_payload

    atomic_torch_save(model_payload(micro_model), tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    mask = dict(loaded.named_buffers())["backbone.clip.attn_mask"]
    assert torch.equal(mask, dict(micro_model.named_buffers())["backbone.clip.attn_mask"])
    texts = ["is red and sleeveless", "same but in navy"]
    assert torch.allclose(loaded.encode_texts(texts), micro_model.encode_texts(texts), atol=1e-6)


@pytest.mark.parametrize(
    ("model", "weights", "skips"),
    [
        ("ViT-B-32", "/w/open_clip_model.safetensors", True),
        ("ViT-B-32", "/w/model.pt", True),
        ("ViT-B-32", None, False),
        ("ViT-B-32", "/w/ViT-B-32.npz", False),  # big_vision weights: loaded without a strictness check
        ("local-dir:/w", "/w/model.pt", False),  # finds (or misses) its own weights
        ("hf-hub:timm/ViT-B-32", "laion2b", False),
    ],
)
def test_the_random_init_is_skipped_only_where_every_weight_is_loaded(model, weights, skips):
    assert backbone._loads_every_weight(model, weights) is skips


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_local_pretrained_file_gives_exactly_its_weights_without_a_random_init(
    tmp_path, micro_model, monkeypatch, suffix
):
    """`--pretrained /path/to/weights` (how real OpenCLIP weights are used offline): loaded strictly by
    open_clip, so the random init it would overwrite is skipped."""
    weights = {k: v.clone().contiguous() for k, v in micro_model.backbone.clip.state_dict().items()}
    path = tmp_path / f"open_clip_model{suffix}"
    if suffix == ".pt":
        torch.save(weights, path)
    else:
        from safetensors.torch import save_file

        save_file(weights, str(path))
    calls = _count_real_inits(monkeypatch)
    model = create_model("fs-micro", str(path))
    assert not calls and model.backbone.spec.pretrained == str(path)
    for name, value in model.backbone.clip.state_dict().items():
        assert torch.equal(value, weights[name]), name
    del weights["visual.conv1.weight"]
    torch.save(weights, tmp_path / "partial.pt")
    with pytest.raises(FashionSearchError, match="conv1"):
        create_model("fs-micro", str(tmp_path / "partial.pt"))
