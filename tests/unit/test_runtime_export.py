"""Exported runtimes: ONNX Runtime and OpenVINO agree with PyTorch, exports are checked, mixes refused."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fashion_search.errors import FashionSearchError, IndexMismatchError
from fashion_search.index.build import check_runtime

pytest.importorskip("onnxruntime")

TEXTS = ["a red dress", "is shorter and sleeveless", "blue"]


@pytest.fixture(scope="module")
def combiner_model():
    """fs-micro with a combiner whose learned part is not zero (a fresh one starts as a gated sum)."""
    from fashion_search.models.checkpoint import create_model

    torch.manual_seed(1)
    model = create_model("fs-micro", "none", fusion="combiner", device="cpu").eval()
    torch.nn.init.normal_(model.fusion.out.weight, std=0.2)
    return model


@pytest.fixture(scope="module")
def exports(combiner_model, tmp_path_factory):
    from fashion_search.runtime import use_runtime
    from fashion_search.runtime.export import export_model
    from fashion_search.runtime.exported import ExportedModel

    cache = tmp_path_factory.mktemp("exports")
    formats = ["onnx"] + (["openvino"] if importlib.util.find_spec("openvino") is not None else [])
    out = {
        (f, p): use_runtime(combiner_model, f, p, cache_dir=cache) for f in formats for p in ("fp32", "int8")
    }
    photos = _photos(tmp_path_factory.mktemp("calibration"), 12)
    for f in formats:  # int8 with calibration photos: the image tower's activations too
        folder = export_model(combiner_model, cache / f"{f}-static", f, "int8", calibration=photos)
        out[(f, "int8-static")] = ExportedModel(combiner_model, folder)
    return out


def _photos(folder, n: int) -> list:
    from PIL import Image

    g = torch.Generator().manual_seed(2)
    paths = []
    for i in range(n):
        arr = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=g).numpy()
        paths.append(folder / f"{i}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


def _pixels(n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)


def _min_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


KINDS = [(f, p) for f in ("onnx", "openvino") for p in ("fp32", "int8", "int8-static")]


@pytest.mark.parametrize("kind", KINDS, ids=["-".join(k) for k in KINDS])
def test_exported_embeddings_agree_with_torch(combiner_model, exports, kind):
    if kind not in exports:
        pytest.skip("openvino is not installed")
    model, exported = combiner_model, exports[kind]
    floor = 0.999 if kind[1] == "fp32" else 0.99
    img, img_x = model.encode_pixels(_pixels()), exported.encode_pixels(_pixels())
    txt, txt_x = model.encode_texts(TEXTS), exported.encode_texts(TEXTS)
    assert img_x.shape == img.shape and img_x.dtype == torch.float32
    assert _min_cos(img, img_x) >= floor
    assert _min_cos(txt, txt_x) >= floor
    for w in (0.3, 0.5, 0.8):
        composed = model.compose(img[:3], txt, w)
        assert _min_cos(composed, exported.compose(img_x[:3], txt_x, w)) >= floor
    # The slider's ends are the towers' own embeddings, as in PyTorch.
    assert torch.allclose(exported.compose(img_x[:3], txt_x, 0.0), img_x[:3], atol=1e-6)
    assert exported.identity()["runtime"] == kind[0] and exported.identity()["precision"] == kind[1][:4]
    assert exported.identity()["checkpoint_sha256"] == model.identity()["checkpoint_sha256"]


def test_int8_manifest_says_what_was_quantized_and_how(exports):
    import onnx

    from fashion_search.runtime.export import read_export

    dynamic = read_export(exports[("onnx", "int8")].export_dir)
    static = read_export(exports[("onnx", "int8-static")].export_dir)
    assert dynamic["quantization"] == {"image": "dynamic", "text": "dynamic"}
    assert dynamic["calibration_images"] == 0
    assert static["quantization"] == {"image": "static", "text": "dynamic"}
    assert static["calibration_images"] == 12
    # Static: the image graph carries activation quantizers (QDQ); dynamic computes scales at run time.
    ops = {
        n.op_type
        for n in onnx.load(str(exports[("onnx", "int8-static")].export_dir / "image.onnx")).graph.node
    }
    assert "QuantizeLinear" in ops and "DynamicQuantizeLinear" not in ops
    if ("openvino", "int8") in exports:
        assert read_export(exports[("openvino", "int8")].export_dir)["quantization"] == {
            "image": "weights",
            "text": "weights",
        }
        assert (
            read_export(exports[("openvino", "int8-static")].export_dir)["quantization"]["image"] == "static"
        )


def test_calibration_input_errors_are_one_line(combiner_model, tmp_path):
    from fashion_search.runtime.export import export_model
    from fashion_search.runtime.quantize import calibration_photos

    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(FashionSearchError, match="no decodable calibration photos"):
        export_model(combiner_model, tmp_path / "x", "onnx", "int8", calibration=[tmp_path / "bad.jpg"])
    with pytest.raises(FashionSearchError, match="add --int8"):
        export_model(combiner_model, tmp_path / "y", "onnx", "fp32", calibration=[tmp_path / "bad.jpg"])
    (tmp_path / "empty").mkdir()
    for folder, why in (("missing", "does not exist"), ("empty", "holds no images")):
        with pytest.raises(FashionSearchError, match=f"calibration folder .*{why}"):
            calibration_photos(tmp_path / folder)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_calibration_photos_spread_over_the_folder(tmp_path):
    from fashion_search.runtime.quantize import calibration_photos

    photos = _photos(tmp_path, 10)
    picked = calibration_photos(tmp_path, 4)
    assert len(picked) == 4 and len(set(picked)) == 4
    assert picked[0] == str(sorted(photos)[0]) and picked[-1] != str(sorted(photos)[3])
    assert len(calibration_photos(tmp_path, 50)) == 10


def test_export_is_cached_and_reused(combiner_model, exports):
    from fashion_search.runtime import use_runtime

    first = exports[("onnx", "fp32")].export_dir
    stamp = (first / "image.onnx").stat().st_mtime_ns
    again = use_runtime(combiner_model, "onnx", "fp32", cache_dir=first.parent.parent)
    assert again.export_dir == first and (first / "image.onnx").stat().st_mtime_ns == stamp


def test_damaged_export_is_one_line(combiner_model, exports, tmp_path):
    import shutil

    from fashion_search.runtime.exported import ExportedModel

    src = exports[("onnx", "fp32")].export_dir
    cut, garbled = tmp_path / "cut", tmp_path / "garbled"
    shutil.copytree(src, cut)
    shutil.copytree(src, garbled)
    data = (cut / "image.onnx").read_bytes()
    (cut / "image.onnx").write_bytes(data[: len(data) // 2])
    (garbled / "text.onnx").write_bytes(b"\x07" * len((garbled / "text.onnx").read_bytes()))  # same size
    for folder, file in ((cut, "image.onnx"), (garbled, "text.onnx")):
        with pytest.raises(FashionSearchError) as err:
            ExportedModel(combiner_model, folder)
        assert "\n" not in str(err.value) and file in str(err.value)


def test_export_of_another_model_is_refused(exports):
    from fashion_search.models.checkpoint import create_model
    from fashion_search.runtime.exported import ExportedModel

    other = create_model("fs-micro", "none", fusion="sum", device="cpu")
    with pytest.raises(FashionSearchError, match="another model"):
        ExportedModel(other, exports[("onnx", "fp32")].export_dir)


def test_token_fusion_export_is_refused(tmp_path):
    from fashion_search.models.checkpoint import create_model
    from fashion_search.runtime.export import export_model

    model = create_model("fs-micro", "none", fusion="attention", device="cpu")
    with pytest.raises(FashionSearchError, match="--runtime torch"):
        export_model(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_missing_runtime_package_is_one_line(monkeypatch):
    from fashion_search.runtime import export

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "openvino" else real(n, *a))
    with pytest.raises(FashionSearchError, match=r"pip install 'fashion-search\[openvino\]'"):
        export.require("openvino")


@pytest.mark.parametrize(
    ("built", "now", "ok"),
    [
        ({}, {"runtime": "onnx", "precision": "fp32"}, True),  # an index from before runtimes: torch fp32
        ({"runtime": "openvino", "precision": "fp32"}, {"runtime": "torch", "precision": "fp32"}, True),
        ({"runtime": "onnx", "precision": "int8"}, {"runtime": "onnx", "precision": "int8"}, True),
        ({"runtime": "onnx", "precision": "int8"}, {"runtime": "onnx", "precision": "fp32"}, False),
        ({}, {"runtime": "onnx", "precision": "int8"}, False),
        ({"runtime": "onnx", "precision": "int8"}, {"runtime": "openvino", "precision": "int8"}, False),
    ],
)
def test_runtime_mixing_rule(built, now, ok):
    if ok:
        check_runtime(built, now, "index x")
    else:
        with pytest.raises(IndexMismatchError, match="do not mix"):
            check_runtime(built, now, "index x")


def test_cache_key_follows_a_fusion_drawn_without_checkpoint(combiner_model):
    import copy

    from fashion_search.runtime.export import export_name

    other = copy.deepcopy(combiner_model)
    torch.nn.init.normal_(other.fusion.gate[0].weight)
    assert export_name(other, "onnx", "fp32") != export_name(combiner_model, "onnx", "fp32")
    assert export_name(copy.deepcopy(combiner_model), "onnx", "fp32") == export_name(
        combiner_model, "onnx", "fp32"
    )


def test_a_new_int8_recipe_is_not_served_from_an_older_cached_export(combiner_model, monkeypatch):
    from fashion_search.runtime import export

    fp32, int8 = (
        export.export_name(combiner_model, "onnx", "fp32"),
        export.export_name(combiner_model, "onnx", "int8"),
    )
    monkeypatch.setattr(export, "INT8_RECIPE", export.INT8_RECIPE + 1)
    assert export.export_name(combiner_model, "onnx", "int8") != int8
    assert export.export_name(combiner_model, "onnx", "fp32") == fp32


def test_openvino_int8_says_nothing_about_cuda():
    """NNCF imports torch.utils.cpp_extension, whose import warns "No CUDA runtime is found" on a CPU
    machine with a CUDA build of torch: noise on every OpenVINO int8 export (a fresh process, since the
    module warns only when first imported; with a CPU build of torch there is nothing to hide)."""
    pytest.importorskip("nncf")
    import subprocess
    import sys

    code = (
        "from fashion_search.runtime.quantize import quantize_openvino\n"
        "try:\n    quantize_openvino(None)\nexcept Exception:\n    pass\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "CUDA" not in proc.stderr, proc.stderr[-500:]
