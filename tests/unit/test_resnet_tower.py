"""A ResNet image tower (OpenCLIP's ModifiedResNet, as in RN50 and the compact fs-rn-tiny): it gives
tokens to the attention fusion, gets layer-wise learning rates by stage, and refuses gradient caching,
which its batch norm would make inexact."""

from __future__ import annotations

import pytest
import torch

from fashion_search.config import TrainConfig
from fashion_search.errors import FashionSearchError
from fashion_search.models.checkpoint import atomic_torch_save, create_model, load_checkpoint, model_payload
from fashion_search.training.loop import _check_memory_options
from fashion_search.training.optim import _depth_scale, param_groups


@pytest.fixture(scope="module")
def rn_model():
    torch.manual_seed(0)
    return create_model("fs-rn-tiny", "none", fusion="attention", device="cpu").eval()


def test_resnet_tokens_are_in_the_joint_space_and_the_pooled_half_is_what_the_index_stores(rn_model):
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    image = rn_model.encode_query_pixels(pixels)
    assert image.tokens.shape == (2, 4, 128)  # 64 px / 32 = a 2 x 2 map, in the 128-d joint space
    assert torch.allclose(image.pooled, rn_model.encode_pixels(pixels), atol=1e-5)
    # The tokens are the image's own: the mirrored image gives other ones.
    other = rn_model.encode_query_pixels(torch.flip(pixels, dims=[3]))
    assert not torch.allclose(image.tokens, other.tokens, atol=1e-4)
    query = rn_model.compose(image, rn_model.encode_query_texts(["is red", "has long sleeves"]))
    assert query.shape == (2, 128) and torch.isfinite(query).all()


def _channels_last(model) -> bool:
    return model.backbone.clip.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_a_convolutional_tower_runs_channels_last_with_the_same_features(rn_model, micro_model, tmp_path):
    # Faster on oneDNN and cuDNN (benchmarks/bench_memory_format.py); a ViT's one conv is left alone.
    assert _channels_last(rn_model) and not _channels_last(micro_model)
    pixels = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    fast = rn_model.encode_pixels(pixels)
    rn_model.backbone.clip.visual.to(memory_format=torch.contiguous_format)
    try:
        assert torch.allclose(rn_model.encode_pixels(pixels), fast, atol=1e-5)
        atomic_torch_save(model_payload(rn_model), tmp_path / "checkpoint.pt")  # saved contiguous...
    finally:
        rn_model.backbone.clip.visual.to(memory_format=torch.channels_last)
    loaded = load_checkpoint(tmp_path / "checkpoint.pt").eval()
    assert _channels_last(loaded)  # ... and loaded channels-last, with the same weights
    assert torch.allclose(loaded.encode_pixels(pixels), fast, atol=1e-5)


def test_layer_decay_spreads_the_resnet_stages_over_the_depth():
    decay, depth = 0.5, 12
    # A stage's blocks have their own conv1: they are not the stem, which is the tower's embedding.
    assert _depth_scale("backbone.clip.visual.layer1.0.conv1.weight", depth, decay) == decay**10
    assert _depth_scale("backbone.clip.visual.layer4.0.conv3.weight", depth, decay) == decay**1
    for stem in ("conv1", "conv2", "bn3"):
        assert _depth_scale(f"backbone.clip.visual.{stem}.weight", depth, decay) == decay**13
    for head in ("c_proj.weight", "positional_embedding"):
        assert _depth_scale(f"backbone.clip.visual.attnpool.{head}", depth, decay) == 1.0
    # The ViT's names keep their scales.
    assert _depth_scale("backbone.clip.visual.conv1.weight", depth, decay) == decay**13
    assert _depth_scale("backbone.clip.transformer.resblocks.11.mlp.c_fc.weight", depth, decay) == decay


def test_every_resnet_weight_gets_a_learning_rate(rn_model):
    cfg = TrainConfig(model="fs-rn-tiny", layer_decay=0.8, lr=1e-3)
    groups = param_groups(rn_model, cfg)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in rn_model.parameters() if p.requires_grad)
    assert len({g["lr"] for g in groups}) > 4  # the stages and the stem get their own rates


def test_gradient_caching_is_refused_for_a_batch_norm_tower(rn_model, micro_model):
    with pytest.raises(FashionSearchError, match="--grad-cache-chunk needs towers without batch norm"):
        _check_memory_options(rn_model, TrainConfig(model="fs-rn-tiny", grad_cache_chunk=8))
    _check_memory_options(rn_model, TrainConfig(model="fs-rn-tiny"))
    _check_memory_options(micro_model, TrainConfig(model="fs-micro", grad_cache_chunk=8))


def test_gradient_checkpointing_says_it_covers_the_text_tower_only(caplog):
    model = create_model("fs-rn-tiny", "none", fusion="sum", device="cpu")
    with caplog.at_level("WARNING"):
        _check_memory_options(model, TrainConfig(model="fs-rn-tiny", grad_checkpointing=True))
    assert "covers the text tower only" in caplog.text
    assert model.backbone.clip.transformer.grad_checkpointing


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_a_resnet_tower_exports_to_the_cpu_runtimes(tmp_path, fmt):
    pytest.importorskip("onnxruntime" if fmt == "onnx" else "openvino")
    from fashion_search.runtime.export import export_model
    from fashion_search.runtime.exported import ExportedModel

    torch.manual_seed(1)
    model = create_model("fs-rn-tiny", "none", fusion="combiner", device="cpu").eval()
    exported = ExportedModel(model, export_model(model, tmp_path / fmt, fmt, "fp32"))
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8, generator=g)
    # Batch norm runs on its running statistics in the graph, as in the eval-mode model.
    cos = torch.nn.functional.cosine_similarity(model.encode_pixels(pixels), exported.encode_pixels(pixels))
    assert float(cos.min()) >= 0.999
