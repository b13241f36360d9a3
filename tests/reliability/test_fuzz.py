"""Property-based fuzzing (hypothesis) of the image decoder and of the API's form, body and path parsing."""

from __future__ import annotations

import io
import os
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hostile import tiff_with_rational_offsets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fashion_search.data.images import load_image
from fashion_search.errors import ImageDecodeError
from fashion_search.service.api import create_app
from service_fixtures import service_engine, service_index  # noqa: F401  (fixtures)

# By default derandomized: the same examples on every run, so a failure is a regression, not bad luck.
# FASHION_SEARCH_FUZZ_SCALE=N runs N times as many random (not derandomized) examples: a longer hunt.
SCALE = max(1, int(os.environ.get("FASHION_SEARCH_FUZZ_SCALE") or 1))
FUZZ = settings(
    deadline=None,
    derandomize=SCALE == 1,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


def examples(n: int) -> settings:
    return settings(FUZZ, max_examples=n * SCALE)


def _seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = []
    for fmt, img, kw in [
        ("JPEG", base, {"exif": exif.tobytes()}),
        ("JPEG", base.convert("CMYK"), {}),
        ("PNG", base, {}),
        ("PNG", Image.fromarray((rng.random((8, 8)) * 65535).astype(np.uint16)), {}),
        ("GIF", base.convert("P"), {}),
        ("WEBP", base, {"exif": exif.tobytes()}),
        ("BMP", base, {}),
        ("TIFF", base, {"exif": exif.tobytes()}),
        ("TIFF", base, {"compression": "tiff_lzw"}),
    ]:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        out.append(buf.getvalue())
    return out + [tiff_with_rational_offsets()]


SEEDS = _seeds()


def _decodes_or_refuses(data: bytes) -> None:
    try:
        img = load_image(data, max_pixels=4_000_000)
    except ImageDecodeError as exc:
        assert str(exc)  # a reason, never an empty message
        return
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1


@examples(500)
@given(st.binary(max_size=4096))
def test_any_bytes_decode_or_are_refused(data):
    _decodes_or_refuses(data)


@examples(1000)
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF it skips
@given(
    st.sampled_from(range(len(SEEDS))),
    st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255), st.sampled_from("sdi")), max_size=8
    ),
)
def test_mutated_images_decode_or_are_refused(seed, edits):
    data = bytearray(SEEDS[seed])
    for where, value, op in edits:
        i = int(where * len(data))
        if op == "s":
            data[i] = value
        elif op == "d":
            del data[i : i + 1 + value % 16]
        else:
            data[i:i] = bytes([value]) * (1 + value % 4)
    _decodes_or_refuses(bytes(data))


# -- the API ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(service_engine):  # noqa: F811
    with TestClient(create_app(service_engine), raise_server_exceptions=False) as c:
        yield c


def assert_clean_reply(r, allowed: set[int]) -> None:
    assert r.status_code in allowed, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    if r.status_code != 200:
        assert "detail" in body
    for leak in ("Traceback", 'File "', "/tmp/", "/work/", os.getcwd()):
        assert leak not in r.text, leak


FIELD = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.sampled_from(
        ["0", "1", "10", "1000", "1001", "-1", "0.5", "nan", "inf", "-inf", "1e309", "", " ", "0x10"]
    ),
)


@examples(150)
@given(
    text=FIELD,
    k=FIELD,
    weight=FIELD,
    category=st.one_of(
        st.none(), st.sampled_from(["dress", "shirt", "", "../etc", "dress/"]), st.text(max_size=8)
    ),
    image=st.one_of(st.none(), st.binary(max_size=256), st.sampled_from(SEEDS)),
)
def test_search_form_never_fails_on_the_server_side(client, text, k, weight, category, image):
    data = {
        name: value
        for name, value in (("text", text), ("k", k), ("text_weight", weight), ("category", category))
        if value is not None
    }
    # Form values travel as UTF-8; lone surrogates cannot be sent by any client.
    data = {n: v.encode("utf-8", "replace").decode("utf-8") for n, v in data.items()}
    files = {"image": ("q.jpg", image, "image/jpeg")} if image is not None else None
    r = client.post("/search", data=data, files=files)
    assert_clean_reply(r, {200, 400, 413, 415, 422})


@examples(150)
@given(
    body=st.binary(max_size=512),
    content_type=st.sampled_from(
        [
            "multipart/form-data; boundary=xyz",
            "multipart/form-data",
            "multipart/form-data; boundary=",
            "multipart/form-data; boundary=" + "a" * 300,
            "application/x-www-form-urlencoded",
            "application/json",
            "text/plain",
            "",
        ]
    ),
    prefix=st.sampled_from(
        [b"", b"--xyz\r\n", b'--xyz\r\nContent-Disposition: form-data; name="text"\r\n\r\n']
    ),
)
def test_raw_bodies_are_refused_cleanly(client, body, content_type, prefix):
    headers = {"content-type": content_type} if content_type else {}
    r = client.post("/search", content=prefix + body, headers=headers)
    assert_clean_reply(r, {200, 400, 413, 415, 422})


@examples(200)
@given(
    item=st.one_of(
        st.text(min_size=1, max_size=60),
        st.lists(
            st.sampled_from(["..", ".", "", "dress", "item00.jpg", "%2e%2e", "etc", "passwd", "\x00"]),
            max_size=6,
        ).map("/".join),
    ),
    encode=st.booleans(),
)
def test_item_urls_serve_indexed_files_only(client, service_engine, item, encode):  # noqa: F811
    url = "/items/" + (quote(item.encode("utf-8", "replace"), safe="/") if encode else item) + "/image"
    try:
        r = client.get(url)
    except Exception:  # a URL the HTTP client itself refuses to send never reaches the server
        return
    if r.status_code == 200:
        served = r.content
        assert any(served == (service_engine.catalog_root / i).read_bytes() for i in service_engine.ids())
    else:
        assert_clean_reply(r, {404, 405})
