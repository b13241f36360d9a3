"""The Streamlit page's logic under AppTest: messages, search, slider, refinement history, uploads,
catalog filters and product cards."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import fashion_search.data.images as images
import fashion_search.service.ui_launch as ui_launch
from fashion_search.models.retrieval import RetrievalModel
from service_fixtures import (  # noqa: F401  (fixtures)
    build_service_index,
    empty_index,
    garment_image,
    make_catalog,
    open_page,
    service_engine,
    service_index,
    shop_index,
)

UI = Path(ui_launch.__file__).with_name("ui.py")


def page(monkeypatch, index: Path | str) -> AppTest:
    at = open_page(monkeypatch, index)
    assert not at.exception, [e.value for e in at.exception]
    return at


def result_ids(at: AppTest) -> list[str]:
    # Each result card shows "**N.** `id`"; N is its rank.
    return [m.value.split("`")[1] for m in at.markdown if re.match(r"^\*\*\d+\.\*\* `", m.value)]


def filter_keys(at: AppTest) -> set[str]:
    widgets = [*at.slider, *at.multiselect, *at.checkbox, *at.text_input]
    return {w.key for w in widgets if w.key and w.key.startswith("flt_")}


def scores(at: AppTest) -> list[float]:
    return [float(c.value.split("**")[1]) for c in at.caption if c.value.startswith("similarity")]


@pytest.fixture
def app(monkeypatch, service_index):  # noqa: F811
    return page(monkeypatch, service_index)


def test_no_query_yet_says_what_to_do(app):
    assert [i.value for i in app.info] == [
        "Start with a reference photo, a description of what you want, or both."
    ]
    assert result_ids(app) == []
    assert app.radio(key="mode").value == "Image + text" and app.slider(key="text_weight").value == 0.5
    assert app.selectbox(key="category").options == ["All categories", "dress", "shirt"]


def test_text_search_shows_k_results_best_first(app):
    app.text_input(key="text").input("a red striped dress").run()
    assert len(result_ids(app)) == 12 and scores(app) == sorted(scores(app), reverse=True)
    app.number_input(key="k").set_value(5).run()
    assert len(result_ids(app)) == 5
    assert [b.key for b in app.button if b.key.startswith("use_")] == [f"use_{i}" for i in range(5)]
    app.selectbox(key="category").set_value("shirt").run()
    assert all(i.startswith("shirt/") for i in result_ids(app))


def test_mode_specific_hints(app):
    app.radio(key="mode").set_value("Image only").run()
    assert "reference" in app.info[0].value
    app.text_input(key="text").input("blue").run()
    assert result_ids(app) == [] and app.info  # image-only ignores the words
    app.radio(key="mode").set_value("Text only").run()
    assert len(result_ids(app)) == 12 and app.slider(key="text_weight").disabled


def test_slider_reruns_search_without_re_encoding(app, monkeypatch):
    encoded = []
    original = RetrievalModel.encode_pixels
    monkeypatch.setattr(
        RetrievalModel, "encode_pixels", lambda self, px: encoded.append(len(px)) or original(self, px)
    )
    buf = io.BytesIO()
    garment_image((13, 57, 91), period=5).save(buf, format="PNG")  # never seen before: one encode
    app.file_uploader(key="upload").upload("new.png", buf.getvalue(), "image/png").run()
    app.text_input(key="text").input("is longer").run()
    assert encoded == [1] and len(result_ids(app)) == 12
    before = scores(app)
    app.slider(key="text_weight").set_value(0.9).run()
    assert scores(app) != before  # the search ran again with the new weight...
    assert encoded == [1]  # ...from the cached image embedding


def test_use_as_reference_builds_a_history_and_back_restores(app):
    app.text_input(key="text").input("a red dress").run()
    first = result_ids(app)[0]
    app.button(key="use_0").click().run()
    s = app.session_state
    assert len(s.history) == 1 and s.ref == {"id": first} and app.text_input(key="text").value == ""
    assert result_ids(app)[0] == first  # empty text: neighbours of the new reference, itself first
    assert app.button(key="use_0").disabled and app.button(key="use_0").label == "Current reference"
    app.text_input(key="text").input("is darker").run()
    second = result_ids(app)[1]
    app.button(key="use_1").click().run()
    assert len(app.session_state.history) == 2 and app.session_state.ref == {"id": second}
    turns = [m.value for m in app.markdown if m.value.startswith("**Turn")]
    assert turns[0].startswith("**Turn 1** · no reference + “a red dress”") and f"`{second}`" in turns[1]

    app.button(key="back").click().run()
    assert len(app.session_state.history) == 1 and app.session_state.ref == {"id": first}
    assert app.text_input(key="text").value == "is darker"
    app.button(key="restore_0").click().run()
    assert app.session_state.history == [] and app.session_state.ref is None
    assert app.text_input(key="text").value == "a red dress"


def test_upload_good_and_bad(app, service_engine):  # noqa: F811
    app.file_uploader(key="upload").upload("broken.jpg", b"<html>not a photo</html>", "image/jpeg").run()
    assert "Could not read 'broken.jpg' as an image" in app.error[0].value
    assert app.session_state.ref is None
    photo = service_engine.item_path("dress/item06.jpg").read_bytes()
    app.file_uploader(key="upload").clear().upload("mine.jpg", photo, "image/jpeg").run()
    assert not app.error and app.session_state.ref["name"] == "mine.jpg"
    assert result_ids(app)[0] == "dress/item06.jpg" and scores(app)[0] == pytest.approx(1.0, abs=1e-3)
    app.button(key="clear_ref").click().run()
    assert app.session_state.ref is None and app.info


def test_the_page_leaves_the_interpreters_main_module_in_place(service_index):  # noqa: F811
    main = sys.modules["__main__"]
    with pytest.MonkeyPatch.context() as mp:
        page(mp, service_index)
    # else a later multiprocessing spawn (torch's mp.spawn) re-runs the page as its children's main
    assert sys.modules["__main__"] is main


def test_empty_index_warns(monkeypatch, empty_index):  # noqa: F811
    at = page(monkeypatch, empty_index)
    assert "The index is empty" in at.warning[0].value and not at.text_input


def test_missing_index_is_an_error_not_a_crash(monkeypatch, tmp_path):
    at = page(monkeypatch, tmp_path / "nowhere")
    assert at.error[0].value.startswith("Cannot open the index")


def test_launch_command_passes_the_index_after_the_separator(tmp_path):
    cmd = ui_launch.ui_command(tmp_path, "127.0.0.1", 8600, device="cpu")
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(UI)
    assert cmd[cmd.index("--") + 1 :] == ["--index", str(tmp_path.resolve()), "--device", "cpu"]
    assert (
        cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
        and cmd[cmd.index("--server.port") + 1] == "8600"
    )


# -- catalog filters and product cards -------------------------------------------------------------------
@pytest.fixture
def shop(monkeypatch, shop_index):  # noqa: F811
    index, rows = shop_index
    at = page(monkeypatch, index)
    at.text_input(key="text").input("a striped garment").run()
    return at, rows


def test_a_catalog_without_metadata_has_no_filter_widgets(app):
    assert filter_keys(app) == set()
    assert "This catalog has no attributes to filter by." in [c.value for c in app.sidebar.caption]
    assert not app.toggle  # no products, nothing to group


def test_filter_widgets_follow_the_schema(shop):
    at, _ = shop
    # Title and url are for the cards; category keeps its own selectbox.
    assert filter_keys(at) == {"flt_brand", "flt_colour", "flt_price", "flt_in_stock"}
    assert at.multiselect(key="flt_brand").options == ["Acme", "Moda", "Zed"]
    assert at.multiselect(key="flt_brand").value == []
    assert at.slider(key="flt_price").value == pytest.approx((12.5, 95.0))
    assert at.checkbox(key="flt_in_stock").label == "Only in stock"
    assert at.toggle(key="group").value is True


def test_filters_narrow_the_results_to_matching_items(shop):
    at, rows = shop
    at.toggle(key="group").set_value(False).run()
    assert len(result_ids(at)) == 12  # every photo, no filter yet
    at.multiselect(key="flt_brand").set_value(["Zed"]).run()
    zed = {i for i, r in rows.items() if r["brand"] == "Zed"}
    assert set(result_ids(at)) == zed
    assert 'filter: `brand in ["Zed"]`' in [c.value for c in at.caption]
    at.slider(key="flt_price").set_value((12.5, 60.0)).run()
    assert set(result_ids(at)) == {i for i in zed if rows[i]["price"] <= 60.0} != set()
    at.checkbox(key="flt_in_stock").check().run()
    expected = {i for i in zed if rows[i]["price"] <= 60.0 and rows[i]["in_stock"]}
    assert set(result_ids(at)) == expected != set()
    at.multiselect(key="flt_brand").set_value([]).run()
    at.slider(key="flt_price").set_value((12.5, 95.0)).run()
    assert set(result_ids(at)) == {i for i, r in rows.items() if r["in_stock"]}
    assert not at.error and not at.exception


def test_cards_show_title_brand_price_and_product(shop):
    at, rows = shop
    at.toggle(key="group").set_value(False).run()
    first = rows[result_ids(at)[0]]
    assert f"**{first['title']}**" in [m.value for m in at.markdown]
    facts = f"{first['brand']} · price {first['price']:,.2f} · product {first['product_id']}"
    assert facts in [c.value for c in at.caption]


def test_one_result_per_product_unless_toggled_off(shop):
    at, rows = shop
    grouped = result_ids(at)
    assert len(grouped) == 6 and len({rows[i]["product_id"] for i in grouped}) == 6
    assert any(c.value.startswith("6 products in") for c in at.caption)
    at.toggle(key="group").set_value(False).run()
    assert len(result_ids(at)) == 12


def test_the_page_never_reads_an_image_outside_the_catalog(monkeypatch, tmp_path):
    """A symlink in the catalog to a photo outside it is indexed, but the page shows no picture of it:
    its thumbnails go through engine.item_path, the check the HTTP API uses."""
    catalog = make_catalog(tmp_path / "catalog")
    outside = tmp_path / "private" / "secret.jpg"
    outside.parent.mkdir()
    garment_image((200, 10, 10), period=4).save(outside)
    (catalog / "dress" / "linked.jpg").symlink_to(outside)
    index = build_service_index(tmp_path, catalog)

    read = []
    original = images.load_image
    monkeypatch.setattr(
        images, "load_image", lambda source, *a, **kw: read.append(source) or original(source, *a, **kw)
    )
    at = page(monkeypatch, index)
    at.number_input(key="k").set_value(20).run()
    at.text_input(key="text").input("a red dress").run()
    assert "dress/linked.jpg" in result_ids(at)  # the item is found...
    root = catalog.resolve()
    opened = [Path(p).resolve() for p in read if isinstance(p, str)]
    assert opened and all(root in p.parents for p in opened), opened  # ...but its file is never read
