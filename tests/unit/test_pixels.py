"""The reader's pixel path: uint8 geometry in workers + normalisation on the device, and JPEG decoding on
the device (exercised here with torchvision's CPU decoder: the same code as on CUDA but for the device)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from fashion_search.data import pixels as pixels_module
from fashion_search.data.ahead import ahead_in_thread
from fashion_search.data.images import load_image
from fashion_search.data.loading import (
    ImagePathsDataset,
    _BatchAssembler,
    choose_decode,
    collate_decoded,
    embed_paths,
)
from fashion_search.data.pixels import DeviceJpegDecoder, device_decodable
from fashion_search.errors import FashionSearchError, ImageDecodeError


def photo(path, size=(300, 220), seed=0, **save):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    arr = (base + rng.normal(0, 25, base.shape)).clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path, **save)
    return path


def test_uint8_reader_gives_the_transforms_exact_embeddings(micro_model, tmp_path):
    paths = [photo(tmp_path / f"p{i}.jpg", seed=i) for i in range(5)]
    size = micro_model.backbone.image_size
    transform = micro_model.image_transform()
    float_path = torch.stack([transform(load_image(p, draft_size=(size, size))) for p in paths])

    ok, emb, failed = embed_paths(micro_model, paths, workers=0, progress=False, decode="cpu")

    assert ok == list(range(5)) and not failed
    # Bit for bit: the same pixels (/255 and Normalize are single rounded operations either way) in one
    # batch of the same shape through the same forward.
    assert torch.equal(emb, micro_model.encode_pixels(float_path))


def test_the_pipeline_at_another_size_is_the_same_resize_and_crop(micro_model):
    """Training ships pixels larger than the model's input (to augment them): the same geometry, resized
    to that size, and at the model's own size exactly the model's pixels."""
    from torchvision import transforms as T

    pipeline = micro_model.pixel_pipeline
    size, interpolation = pipeline.resize_and_crop()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8))  # not square: a crop
    assert torch.equal(pipeline.at_size(size).to_uint8(image), pipeline.to_uint8(image))
    bigger = pipeline.at_size(2 * size)
    assert bigger.resize_and_crop() == (2 * size, interpolation) and bigger.mean == pipeline.mean
    want = T.CenterCrop(2 * size)(T.Resize(2 * size, interpolation=interpolation)(image))
    assert torch.equal(bigger.to_uint8(image), torch.from_numpy(np.asarray(want).copy()).permute(2, 0, 1))


def test_only_plain_jpegs_are_sent_to_the_device(tmp_path):
    limit = 10**9
    assert device_decodable(photo(tmp_path / "a.jpg").read_bytes(), limit)
    assert device_decodable(photo(tmp_path / "b.jpg", progressive=True).read_bytes(), limit)
    assert not device_decodable(photo(tmp_path / "c.png").read_bytes(), limit)
    grey = Image.open(photo(tmp_path / "d.jpg")).convert("L")
    grey.save(tmp_path / "d.jpg")
    assert not device_decodable((tmp_path / "d.jpg").read_bytes(), limit)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: Pillow's path turns it upright, nvJPEG would not
    photo(tmp_path / "e.jpg", exif=exif)
    assert not device_decodable((tmp_path / "e.jpg").read_bytes(), limit)
    whole = photo(tmp_path / "f.jpg").read_bytes()
    assert not device_decodable(whole[: len(whole) // 2], limit)  # cut short
    assert not device_decodable(whole, 1000)  # over the pixel limit
    assert not device_decodable(photo(tmp_path / "g.jpg", size=(2000, 60)).read_bytes(), limit)  # too thin


def read_mixed_batch(micro_model, paths, decoder=None):
    pipeline = micro_model.pixel_pipeline
    dataset = ImagePathsDataset(paths, pipeline, micro_model.backbone.image_size, device_jpegs=True)
    batch = collate_decoded([dataset[i] for i in range(len(paths))])
    assemble = _BatchAssembler(pipeline, torch.device("cpu"), decoder or DeviceJpegDecoder(pipeline, "cpu"))
    return batch, assemble(batch)


def test_a_mixed_batch_decodes_jpegs_on_the_device_and_the_rest_in_workers(micro_model, tmp_path):
    paths = [
        photo(tmp_path / "plain.jpg", seed=1),
        photo(tmp_path / "progressive.jpg", seed=2, progressive=True),
        photo(tmp_path / "lossless.png", seed=3),
        photo(tmp_path / "plain2.jpg", size=(180, 260), seed=4),
        photo(tmp_path / "grey.jpg", seed=7),
    ]
    Image.open(paths[4]).convert("L").save(paths[4])
    (tmp_path / "broken.jpg").write_bytes(b"<html>not an image</html>")
    paths.append(tmp_path / "broken.jpg")

    batch, (indices, pixels, failed) = read_mixed_batch(micro_model, paths)

    assert batch.jpeg_indices == [0, 1, 3] and batch.indices == [2, 4]
    assert sorted(indices) == [0, 1, 2, 3, 4] and [i for i, _ in failed] == [5]
    assert "not a recognised image format" in failed[0][1]
    # Worker rows are exactly the CPU reader's (draft decode); device rows are Pillow's full decode to
    # within a level (nvJPEG cannot decode at a reduced DCT scale).
    pipeline, size = micro_model.pixel_pipeline, micro_model.backbone.image_size
    for row, i in enumerate(indices):
        if i in batch.indices:
            assert torch.equal(pixels[row], pipeline.to_uint8(load_image(paths[i], draft_size=(size, size))))
        else:
            want = pipeline.to_uint8(load_image(paths[i]))
            assert (pixels[row].int() - want.int()).abs().max() <= 2
    emb = micro_model.encode_pixels(pixels)
    ref = micro_model.encode_pixels(torch.stack([pipeline.to_uint8(load_image(paths[i])) for i in indices]))
    assert (emb * ref).sum(1).min() > 0.999


def test_many_large_images_of_one_size_are_resized_a_bounded_group_at_a_time(
    micro_model, tmp_path, monkeypatch
):
    datas = [photo(tmp_path / f"{i}.jpg", seed=i).read_bytes() for i in range(5)]  # all 300 x 220
    payloads = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    decoder = DeviceJpegDecoder(micro_model.pixel_pipeline, "cpu")
    whole = decoder(payloads)
    groups = []
    resize = decoder._resize_and_crop
    monkeypatch.setattr(decoder, "_resize_and_crop", lambda g: groups.append(len(g)) or resize(g))
    monkeypatch.setattr(pixels_module, "GROUP_ELEMENTS", 2 * 3 * 300 * 220)  # room for two at a time
    assert torch.equal(decoder(payloads), whole)
    assert groups == [2, 2, 1]


def cut_short_with_end_marker(path) -> bytes:
    """A JPEG whose scan data is cut to a few bytes but which still ends in an EOI marker: the header
    check passes, and Pillow (like libjpeg) decodes it with the missing rows filled in."""
    data = path.read_bytes()
    sos = data.index(b"\xff\xda")
    path.write_bytes(data[: sos + 20] + b"\xff\xd9")
    return path.read_bytes()


class Rejecting(DeviceJpegDecoder):
    """The real decoder (torchvision on the CPU), except that it refuses one file as nvJPEG would."""

    def __init__(self, pipeline, bad: bytes, calls: list):
        super().__init__(pipeline, "cpu")
        self.bad, self.calls = bad, calls

    def __call__(self, payloads):
        self.calls.append(len(payloads))
        if any(p.numpy().tobytes() == self.bad for p in payloads):
            raise RuntimeError("nvjpeg: bad bitstream")  # what torchvision raises when nvJPEG refuses a file
        return super().__call__(payloads)


def test_a_jpeg_the_device_rejects_is_redone_alone_then_decoded_by_pillow(micro_model, tmp_path, caplog):
    good = photo(tmp_path / "good.jpg", seed=5)
    bad = cut_short_with_end_marker(photo(tmp_path / "bad.jpg", seed=6))
    assert device_decodable(bad, 10**9)
    calls = []
    decoder = Rejecting(micro_model.pixel_pipeline, bad, calls)

    with caplog.at_level("WARNING"):
        batch, (indices, pixels, failed) = read_mixed_batch(
            micro_model, [good, tmp_path / "bad.jpg"], decoder
        )

    assert batch.jpeg_indices == [0, 1] and calls == [2, 1, 1]  # the batch, then each file alone
    assert indices == [0, 1] and not failed
    assert torch.equal(pixels[1], micro_model.pixel_pipeline.to_uint8(load_image(bad)))
    # Said, once: a slow fallback that every batch took would otherwise pass for a slow GPU decode.
    assert "nvJPEG refused a batch (nvjpeg: bad bitstream)" in caplog.text


def test_a_jpeg_neither_decoder_reads_is_reported(micro_model, tmp_path, monkeypatch):
    good = photo(tmp_path / "good.jpg", seed=5)
    bad = cut_short_with_end_marker(photo(tmp_path / "bad.jpg", seed=6))
    decoder = Rejecting(micro_model.pixel_pipeline, bad, [])

    def pillow_refuses(source, **kwargs):
        raise ImageDecodeError("cannot decode image (broken data stream)")

    monkeypatch.setattr(pixels_module, "load_image", pillow_refuses)
    batch, (indices, pixels, failed) = read_mixed_batch(micro_model, [good, tmp_path / "bad.jpg"], decoder)

    assert indices == [0] and pixels.shape[0] == 1
    assert failed == [(1, "cannot decode image (broken data stream)")]


def test_decode_gpu_is_refused_without_cuda(micro_model):
    assert choose_decode("auto", torch.device("cpu"), micro_model.pixel_pipeline) is False
    with pytest.raises(FashionSearchError, match="--decode gpu needs a CUDA device"):
        choose_decode("gpu", torch.device("cpu"), micro_model.pixel_pipeline)


def test_a_gpu_whose_nvjpeg_fails_says_why(micro_model, monkeypatch, caplog):
    def broken(payloads, device):
        raise RuntimeError("libnvjpeg.so.13: cannot open shared object file\nmore detail")

    monkeypatch.setattr(pixels_module, "decode_jpegs", broken)
    cuda = torch.device("cuda")
    with pytest.raises(FashionSearchError) as err:
        choose_decode("gpu", cuda, micro_model.pixel_pipeline)
    assert "RuntimeError: libnvjpeg.so.13: cannot open shared object file" in str(err.value)
    assert "more detail" not in str(err.value)  # one line
    with caplog.at_level("WARNING"):
        assert choose_decode("auto", cuda, micro_model.pixel_pipeline) is False
    assert "decoding JPEGs on the CPU: torchvision's nvJPEG probe failed" in caplog.text


def test_ahead_in_thread_keeps_order_reraises_and_stops_when_left():
    assert list(ahead_in_thread(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad batch")

    got = []
    with pytest.raises(ValueError, match="bad batch"):
        for item in ahead_in_thread(failing(), depth=2):
            got.append(item)
    assert got == [1]

    produced = []

    def endless():
        for i in range(10**6):
            produced.append(i)
            yield i

    for item in ahead_in_thread(endless(), depth=2):
        if item == 3:
            break
    time.sleep(0.3)
    assert len(produced) <= 3 + 2 + 2  # the consumer's 4, the queue's 2, one in the thread's hand


def test_ahead_in_thread_gathers_what_is_ready_in_order_and_still_reraises():
    def numbers(n, fail=False):
        yield from range(n)
        if fail:
            raise ValueError("bad batch")

    groups = []
    for group in ahead_in_thread(numbers(40), depth=4, gather=True):
        groups.append(group)
        time.sleep(0.02)  # a slow consumer: the producer fills the queue meanwhile
    assert [x for g in groups for x in g] == list(range(40))
    assert max(map(len, groups)) > 1 and all(1 <= len(g) <= 4 for g in groups)

    got = []
    with pytest.raises(ValueError, match="bad batch"):
        for group in ahead_in_thread(numbers(5, fail=True), depth=8, gather=True):
            got += group
            time.sleep(0.05)
    assert got == list(range(5))  # what came before the error is delivered first


# CUDA's stream rules, checked with stand-ins for torch.cuda's streams (no GPU here; gpu_suite.sh's
# `decode` step checks the real thing: diagnose_decode.py's `pipeline`).


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log, self.events = name, log, 0

    def synchronize(self):
        self.log.append((self.name, "synchronize"))

    def record_event(self):
        self.events += 1
        self.log.append((self.name, "record", self.events))
        return self.events

    def wait_event(self, event):
        self.log.append((self.name, "wait", event))


def test_nvjpeg_starts_only_once_the_callers_stream_is_idle(monkeypatch):
    # nvJPEG writes into memory the caching allocator recycles from the caller's stream without waiting
    # for the kernels queued there (pytorch/vision PR 9606): those kernels must have run first.
    import torchvision.io

    log = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream("caller", log))
    monkeypatch.setattr(
        torchvision.io, "decode_jpeg", lambda data, mode, device: log.append(("nvjpeg", str(device))) or []
    )
    pixels_module.decode_jpegs([torch.zeros(8, dtype=torch.uint8)], "cuda")
    assert log == [("caller", "synchronize"), ("nvjpeg", "cuda")]
    log.clear()
    pixels_module.decode_jpegs([torch.zeros(8, dtype=torch.uint8)], "cpu")
    assert log == [("nvjpeg", "cpu")]


def test_the_next_batch_is_issued_on_a_stream_of_its_own_and_waited_for_before_use(monkeypatch):
    import contextlib
    import threading

    from fashion_search.data.cuda_pipeline import _issued_on, _received_from

    log, current = [], threading.local()
    side, main = FakeStream("side", log), FakeStream("main", log)

    @contextlib.contextmanager
    def use(stream):
        before, current.stream = getattr(current, "stream", main), stream
        try:
            yield
        finally:
            current.stream = before

    monkeypatch.setattr(torch.cuda, "stream", use)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: getattr(current, "stream", main))

    class Pixels:
        def __init__(self, i):
            self.i = i

        def record_stream(self, stream):
            log.append((stream.name, "uses", self.i))

    def batches():
        for i in range(1, 4):
            log.append((torch.cuda.current_stream().name, "issue", i, threading.current_thread().name))
            yield [i], Pixels(i), []

    finished = []
    issued = _issued_on(side, batches(), finished=lambda: finished.append(threading.current_thread().name))
    received = _received_from(ahead_in_thread(issued, depth=2), torch.device("cuda"))
    for indices, pixels, _ in received:
        log.append(("main", "got", pixels.i))
        assert indices == [pixels.i]
    for i in (1, 2, 3):
        assert ("side", "issue", i, "batch-ahead") in log  # queued on the side stream, by the thread
        issued, recorded = log.index(("side", "issue", i, "batch-ahead")), log.index(("side", "record", i))
        waited, used, got = (
            log.index(("main", "wait", i)),
            log.index(("main", "uses", i)),
            log.index(("main", "got", i)),
        )
        assert issued < recorded < waited < got and used < got
    assert finished == ["batch-ahead"]  # the stream is free again once its thread issues no more


def test_side_streams_are_reused_but_lent_to_one_pipeline_at_a_time(monkeypatch):
    from fashion_search.data.cuda_pipeline import _StreamPool

    made = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: made.append(object()) or made[-1])
    pool, cuda = _StreamPool(), torch.device("cuda")
    a, b = pool.borrow(cuda), pool.borrow(cuda)
    assert a is not b  # two pipelines at once: two streams
    pool.give_back(cuda, a)
    assert pool.borrow(cuda) is a and len(made) == 2  # then reused, not one more per call
