"""Streamlit page over the SearchEngine: a reference photo plus a change in words, refined turn by turn."""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import time
from pathlib import Path

import streamlit as st

from fashion_search.data.images import load_image
from fashion_search.errors import FashionSearchError, ImageDecodeError
from fashion_search.service.engine import SearchEngine, SearchResult
from fashion_search.service.ui_filters import draw_filters, draw_product_details, filter_skip, md_escape

MODES = ("Image + text", "Text only", "Image only")
UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "gif"]
MAX_UI_K = 100  # the engine allows 1000; a page of 1000 product cards helps nobody
GRID_COLUMNS = 4
SAMPLE_SIZE = 8
THUMB_PX = 320
MAX_UPLOAD_PIXELS = 40_000_000  # same bound as the HTTP API
WIDGET_DEFAULTS = {
    "mode": MODES[0],
    "text": "",
    "text_weight": 0.5,
    "k": 12,
    "category": "All categories",
    "group": True,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """`streamlit run ui.py -- --index INDEX [--device D]`; FASHION_SEARCH_INDEX / _DEVICE as fallbacks."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--index", default=os.environ.get("FASHION_SEARCH_INDEX"))
    parser.add_argument("--device", default=os.environ.get("FASHION_SEARCH_DEVICE") or None)
    parser.add_argument("--runtime", default=os.environ.get("FASHION_SEARCH_RUNTIME") or None)
    parser.add_argument("--precision", default=os.environ.get("FASHION_SEARCH_PRECISION") or None)
    return parser.parse_known_args(argv)[0]  # tolerate foreign argv (pytest's, under AppTest)


@st.cache_resource(show_spinner="Loading the model and the catalog index…")
def load_engine(
    index_dir: str, device: str | None, runtime: str | None = None, precision: str | None = None
) -> SearchEngine:
    return SearchEngine.open(index_dir, device=device, runtime=runtime, precision=precision)


def make_thumbnail(source: str | bytes) -> bytes | None:
    """A small JPEG of a catalog file or an upload, so the page never ships full-size photos."""
    try:
        img = load_image(source, max_pixels=MAX_UPLOAD_PIXELS, draft_size=(THUMB_PX * 2, THUMB_PX * 2))
    except (ImageDecodeError, OSError):
        return None
    img.thumbnail((THUMB_PX, THUMB_PX))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85)
    return out.getvalue()


@st.cache_data(max_entries=2048, show_spinner=False)
def item_thumbnail(path: str, mtime_ns: int) -> bytes | None:  # mtime_ns: a changed file is re-read
    return make_thumbnail(path)


# -- state and the callbacks that change it (they run before the page redraws) ------------------------
def init_state() -> None:
    s = st.session_state
    for key, value in WIDGET_DEFAULTS.items():
        s.setdefault(key, value)
    s.setdefault("ref", None)  # None | {"id": item id} | {"upload": bytes, "thumb": bytes, "name": str}
    s.setdefault("history", [])  # turns: {"ref", "text", "mode", "chosen"}
    s.setdefault("upload_error", None)
    s.setdefault("sample_seed", 0)


def _start_from(ref: dict) -> None:
    """A new starting reference opens a new conversation."""
    s = st.session_state
    s.ref, s.history = ref, []
    if s.mode == "Text only":
        s.mode = MODES[0]


def on_upload() -> None:
    s = st.session_state
    up = s.get("upload")
    if up is None:
        s.upload_error = None
        return
    data = up.getvalue()
    try:
        load_image(data, max_pixels=MAX_UPLOAD_PIXELS)
    except ImageDecodeError as exc:
        s.upload_error = f"Could not read {up.name!r} as an image: {exc}."
        return
    s.upload_error = None
    _start_from({"upload": data, "thumb": make_thumbnail(data), "name": up.name})


def use_sample(item_id: str) -> None:
    _start_from({"id": item_id})


def use_as_reference(item_id: str) -> None:
    """Refinement: the chosen result becomes the reference and the text box is free for the next change."""
    s = st.session_state
    s.history.append({"ref": s.ref, "text": s.text, "mode": s.mode, "chosen": item_id})
    s.ref, s.text = {"id": item_id}, ""
    if s.mode == "Text only":
        s.mode = MODES[0]


def restore_turn(n: int) -> None:
    s = st.session_state
    turn = s.history[n]
    s.ref, s.text, s.mode, s.history = turn["ref"], turn["text"], turn["mode"], s.history[:n]


def go_back() -> None:
    if st.session_state.history:
        restore_turn(len(st.session_state.history) - 1)


def start_over() -> None:
    s = st.session_state
    s.ref, s.history, s.text = None, [], ""


def clear_reference() -> None:
    st.session_state.ref = None


def shuffle_samples() -> None:
    st.session_state.sample_seed += 1


# -- drawing -------------------------------------------------------------------------------------------
def catalog_thumbnail(engine: SearchEngine, item_id: str) -> bytes | None:
    """Every catalog picture on the page comes through here: engine.item_path is the one check (the
    API's too) that an id names a file inside the catalog, so a symlink out of it shows nothing."""
    try:
        path = engine.item_path(item_id)
        return item_thumbnail(str(path), path.stat().st_mtime_ns)
    except (FashionSearchError, OSError):
        return None


def ref_thumbnail(engine: SearchEngine, ref: dict | None) -> bytes | None:
    if ref is None:
        return None
    if "upload" in ref:
        return ref["thumb"]
    return catalog_thumbnail(engine, ref["id"])


def ref_label(ref: dict | None) -> str:
    if ref is None:
        return "no reference"
    return f"uploaded {ref['name']}" if "upload" in ref else ref["id"]


def show_image(data: bytes | None, caption: str | None = None) -> None:
    if data is None:
        st.caption("image unavailable")
    else:
        st.image(data, caption=caption, width="stretch")


def draw_sidebar(engine: SearchEngine) -> str | None:
    """The search settings and the catalog filters; returns the filters' `where` expression."""
    with st.sidebar:
        st.header("Search settings")
        st.radio(
            "Query", MODES, key="mode", help="What the search uses: the reference photo, your words, or both."
        )
        st.slider(
            "Text weight",
            0.0,
            1.0,
            step=0.05,
            key="text_weight",
            disabled=st.session_state.mode != MODES[0],
            help="0 = only the reference photo counts, 1 = only the words count.",
        )
        st.number_input("Number of results", 1, MAX_UI_K, step=1, key="k")
        categories = engine.categories()
        if categories:
            st.selectbox("Category", ["All categories", *categories], key="category")
        info = engine.info()
        if info["products"]:
            st.toggle(
                "One result per product",
                key="group",
                help="Show each product once, by its best matching photo; off: every matching photo.",
            )
        st.header("Filters")
        where = draw_filters(engine.attribute_values(), filter_skip(categories))
        st.divider()
        products = f" of {info['products']:,} products" if info["products"] else ""
        st.caption(
            f"Index: {info['items']:,} items{products} · model `{info['model']}` ({info['pretrained']})"
            f" · {info['fusion']}"
        )
    return where


def draw_reference(engine: SearchEngine) -> None:
    s = st.session_state
    st.subheader("Reference")
    with st.container(border=True, key="reference"):
        if s.ref is None:
            st.caption("No reference yet: upload a photo or pick an item from the catalog below.")
        else:
            show_image(ref_thumbnail(engine, s.ref), caption=ref_label(s.ref))
            st.button("Clear reference", key="clear_ref", on_click=clear_reference, icon=":material/close:")
    st.file_uploader("Upload a photo", type=UPLOAD_TYPES, key="upload", on_change=on_upload)
    if s.upload_error:
        st.error(s.upload_error)


def draw_history(engine: SearchEngine) -> None:
    s = st.session_state
    if not s.history:
        st.caption("Pick “Use as reference” under a result to refine from it; your turns appear here.")
        return
    st.markdown(f"**Conversation** · {len(s.history)} turn{'s' if len(s.history) > 1 else ''}")
    for n, turn in enumerate(s.history):
        with st.container(border=True, key=f"turn_{n}"):
            thumb, words, action = st.columns([1, 4, 1.6], vertical_alignment="center")
            with thumb:
                if turn["ref"] is None:
                    st.caption("text only")
                else:
                    show_image(ref_thumbnail(engine, turn["ref"]))
            words.markdown(
                f"**Turn {n + 1}** · {ref_label(turn['ref'])} + “{turn['text'] or '—'}”  \n→ picked `{turn['chosen']}`"
            )
            action.button(
                "Restore", key=f"restore_{n}", on_click=restore_turn, args=(n,), icon=":material/undo:"
            )
    back, reset = st.columns(2)
    back.button("Back one turn", key="back", on_click=go_back, width="stretch")
    reset.button("Start over", key="reset", on_click=start_over, width="stretch")


def draw_catalog_sample(engine: SearchEngine) -> None:
    ids = sorted(engine.ids())
    sample = random.Random(st.session_state.sample_seed).sample(ids, min(SAMPLE_SIZE, len(ids)))
    with st.expander("Browse the catalog", expanded=st.session_state.ref is None):
        cols = st.columns(SAMPLE_SIZE // 2)
        for i, item_id in enumerate(sample):
            with cols[i % len(cols)]:
                show_image(ref_thumbnail(engine, {"id": item_id}), caption=item_id)
                st.button(
                    "Use as reference",
                    key=f"sample_{i}",
                    on_click=use_sample,
                    args=(item_id,),
                    width="stretch",
                )
        st.button("Show other items", key="shuffle", on_click=shuffle_samples, icon=":material/shuffle:")


def draw_result(engine: SearchEngine, rank: int, r: SearchResult) -> None:
    s = st.session_state
    show_image(catalog_thumbnail(engine, r.id))
    st.markdown(f"**{rank + 1}.** `{r.id}`")
    draw_product_details(r.metadata, r.product_id)
    st.caption(f"similarity **{r.score:.3f}**")
    current = s.ref is not None and s.ref.get("id") == r.id
    st.button(
        "Current reference" if current else "Use as reference",
        key=f"use_{rank}",
        on_click=use_as_reference,
        args=(r.id,),
        disabled=current,  # refining from the item you already hold would be a no-op turn
        width="stretch",
    )


def run_search(engine: SearchEngine, where: str | None) -> None:
    s = st.session_state
    use_image, use_text = s.mode != "Text only", s.mode != "Image only"
    image = None
    if use_image and s.ref is not None:
        image = s.ref["upload"] if "upload" in s.ref else engine.item_path(s.ref["id"])
    text = s.text.strip() if use_text else ""
    if image is None and not text:
        hint = {
            "Image only": "Upload a photo or pick a catalog item as the reference to search by image.",
            "Text only": "Describe what you are looking for, e.g. “a red summer dress with short sleeves”.",
        }.get(s.mode, "Start with a reference photo, a description of what you want, or both.")
        st.info(hint, icon=":material/lightbulb:")
        return
    category = None if s.category == "All categories" or not engine.categories() else s.category
    started = time.perf_counter()
    try:
        # Only the fused query depends on the weight: the engine caches both embeddings, so moving
        # the slider costs one index lookup, not a new forward pass.
        results = engine.search(
            image=image,
            text=text or None,
            text_weight=s.text_weight if image is not None and text else None,
            k=int(s.k),
            category=category,
            where=where,
            group=bool(s.group),
        )
    except ImageDecodeError as exc:
        st.error(f"The reference image cannot be used: {exc}.")
        return
    except FashionSearchError as exc:
        st.error(str(exc))
        return
    what = " + ".join(
        p for p in ("reference photo" if image is not None else "", f"“{text}”" if text else "") if p
    )
    st.subheader(f"Results for {what}")
    unit = "products" if s.group and engine.info()["products"] else "items"
    st.caption(f"{len(results)} {unit} in {(time.perf_counter() - started) * 1000:.0f} ms")
    if where:
        # As code, so Markdown leaves it as typed (no ≤ for <=) and it pastes into `search --where`.
        st.caption(f"filter: `{where}`" if "`" not in where else f"filter: {md_escape(where)}")
    if not results:
        st.warning("No items match this filter.")
        return
    for start in range(0, len(results), GRID_COLUMNS):
        cols = st.columns(GRID_COLUMNS)
        for col, (rank, r) in zip(cols, enumerate(results[start : start + GRID_COLUMNS], start)):
            with col, st.container(border=True, key=f"result_{rank}"):
                draw_result(engine, rank, r)


def main() -> None:
    st.set_page_config(page_title="fashion-search", page_icon="👗", layout="wide")
    init_state()
    args = parse_args(sys.argv[1:])
    st.title("fashion-search")
    st.caption(
        "Find catalog items from a reference photo plus a change in words — then refine, turn by turn."
    )
    if not args.index:
        st.error("No index given: run `fashion-search ui --index INDEX` (or set FASHION_SEARCH_INDEX).")
        st.stop()
    try:
        engine = load_engine(str(Path(args.index).resolve()), args.device, args.runtime, args.precision)
    except FashionSearchError as exc:
        st.error(f"Cannot open the index: {exc}")
        st.stop()
    if len(engine) == 0:
        st.warning(
            "The index is empty: add images with `fashion-search index IMAGES --out INDEX`, then reload.",
            icon=":material/inventory_2:",
        )
        st.stop()
    where = draw_sidebar(engine)
    left, right = st.columns([1, 2], gap="large")
    with left:
        draw_reference(engine)
    with right:
        st.subheader("Describe the change")
        st.text_input(
            "What should be different?",
            key="text",
            max_chars=500,
            placeholder="e.g. is shorter and sleeveless, in dark blue",
        )
        draw_history(engine)
    draw_catalog_sample(engine)
    run_search(engine, where)


main()
