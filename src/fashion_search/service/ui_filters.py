"""The page's catalog filters and product details: widgets built from the index's attribute schema, turned
into one `where` expression for SearchEngine.search (the engine does the filtering)."""

from __future__ import annotations

import math
import re
from typing import Any

import streamlit as st

from fashion_search.catalog import filters
from fashion_search.catalog.attributes import CATEGORY

MAX_PICKER_VALUES = 50  # more distinct strings than this make a useless list: an exact-value box instead
KEY_PREFIX = "flt_"
LINK_COLUMNS = ("url", "link", "page_url")
DISPLAY_ONLY = ("title", *LINK_COLUMNS)  # shown on the cards; nobody filters by an exact title or URL
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~])")


def slider_bounds(entry: dict) -> tuple[Any, Any, Any] | None:
    """(low, high, step) of a number attribute's range slider; None when there is nothing to choose."""
    lo, hi = entry.get("min"), entry.get("max")
    if lo is None or hi is None or lo >= hi:
        return None
    if entry.get("integral"):
        return int(lo), int(hi), 1
    # About a hundred stops over the range, on a round step (0.1, 1, 10...) so the labels stay readable.
    step = 10.0 ** math.floor(math.log10((hi - lo) / 100)) if hi - lo >= 1e-9 else (hi - lo)
    return float(lo), float(hi), step


def draw_filters(values: dict[str, dict], skip: set[str]) -> str | None:
    """Sidebar widgets for every attribute worth filtering by; returns their `where` expression or None.

    A widget left as it is adds no condition: a missing value never matches a filter, so a price
    slider left at its full range must not hide the items that have no price.
    """
    conditions: list[filters.Node] = []
    shown = False
    for name, entry in sorted(values.items()):
        if name in skip:
            continue
        key = KEY_PREFIX + name
        kind = entry["type"]
        if kind == "number":
            bounds = slider_bounds(entry)
            if bounds is None:
                continue
            lo, hi, step = bounds
            chosen = st.slider(_label(name), lo, hi, (lo, hi), step=step, key=key)
            if chosen[0] > lo:
                conditions.append(filters.Compare(name, ">=", chosen[0]))
            if chosen[1] < hi:
                conditions.append(filters.Compare(name, "<=", chosen[1]))
        elif kind == "string":
            options = sorted(entry.get("values", []))
            if len(options) < 2:
                continue
            if len(options) <= MAX_PICKER_VALUES:
                picked = st.multiselect(_label(name), options, key=key, placeholder="any")
                if picked:
                    conditions.append(filters.In(name, tuple(picked)))
            else:
                exact = st.text_input(f"{_label(name)} (exact)", key=key, placeholder="any").strip()
                if exact:
                    conditions.append(filters.Compare(name, "==", exact))
        elif kind == "bool":
            if st.checkbox(f"Only {_label(name).lower()}", key=key):
                conditions.append(filters.Compare(name, "==", True))
        else:
            continue
        shown = True
    if not shown:
        st.caption("This catalog has no attributes to filter by.")
    if not conditions:
        return None
    # Built as a tree and written by the filter module: values are quoted there, never pasted in.
    node = conditions[0] if len(conditions) == 1 else filters.And(tuple(conditions))
    return filters.to_milvus(node)


def filter_skip(categories: list[str]) -> set[str]:
    """Attributes that get no filter widget: display-only columns, and category when the catalog's
    folders give it its own selectbox."""
    return {*DISPLAY_ONLY, CATEGORY} if categories else set(DISPLAY_ONLY)


def _label(name: str) -> str:
    return name.replace("_", " ").capitalize()


def md_escape(text: str) -> str:
    """Catalog text shown as itself in Markdown (a title with * or [ must not become formatting)."""
    return _MD_SPECIAL.sub(r"\\\1", text)


def format_price(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return f"{value:,.2f}"


def product_link(metadata: dict) -> str | None:
    """The item's shop page, from the first link column present; only http(s), so a catalog row cannot
    put a javascript: or file: link on the page."""
    for column in LINK_COLUMNS:
        url = metadata.get(column)
        if isinstance(url, str) and re.match(r"^https?://\S+$", url.strip(), re.IGNORECASE):
            return url.strip()
    return None


def draw_product_details(metadata: dict, product_id: str | None) -> None:
    """Title, brand, price and the shop link of a result card, for the columns the catalog has."""
    title = metadata.get("title")
    if isinstance(title, str) and title.strip():
        st.markdown(f"**{md_escape(title.strip())}**")
    facts = []
    if isinstance(metadata.get("brand"), str):
        facts.append(md_escape(metadata["brand"]))
    price = format_price(metadata.get("price"))
    if price is not None:
        facts.append(f"price {price}")
    if product_id is not None:
        facts.append(f"product {md_escape(product_id)}")
    if facts:
        st.caption(" · ".join(facts))
    url = product_link(metadata)
    if url is not None:
        st.link_button("View in shop", url, width="stretch", icon=":material/open_in_new:")
