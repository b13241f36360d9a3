"""Filter expressions in Milvus's boolean syntax: parsed with Python's ast (never eval), checked against a
schema, evaluated as numpy masks over an AttributeStore, and written back out for Milvus."""

from __future__ import annotations

import ast
import bisect
import io
import json
import operator
import tokenize
from dataclasses import dataclass
from typing import Any

import numpy as np

from fashion_search.catalog.attributes import AttributeStore, Column
from fashion_search.errors import FashionSearchError

Value = bool | int | float | str
COMPARISONS = ("==", "!=", "<", "<=", ">", ">=")
_AST_OPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
_FLIP = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_PY_OPS = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
# Milvus also spells its keywords in capitals; they are lowered before Python's parser sees them (same
# length, so every column number still points into the text the user wrote).
_UPPER_KEYWORDS = {"AND": "and", "OR": "or", "NOT": "not", "IN": "in"}
_BOOL_NAMES = {"true": True, "false": False}


@dataclass(frozen=True)
class Compare:
    attribute: str
    op: str  # one of COMPARISONS
    value: Value


@dataclass(frozen=True)
class In:
    attribute: str
    values: tuple[Value, ...]
    negated: bool = False  # `not in`


@dataclass(frozen=True)
class And:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    item: Node


Node = Compare | In | And | Or | Not


# -- parsing -------------------------------------------------------------------------------------------
class _Error(Exception):
    def __init__(self, node: ast.AST | None, message: str) -> None:
        super().__init__(message)
        self.node, self.message = node, message


def parse(expr: str) -> Node:
    """The tree of a filter expression; a malformed one raises FashionSearchError naming the column."""
    if not isinstance(expr, str) or not expr.strip():
        raise FashionSearchError("empty filter expression")
    # Newlines and tabs become spaces (same length): an expression is one line, and Python's parser
    # would otherwise reject a line break outside brackets and report positions by line.
    text = _lower_keywords(expr.translate({10: 32, 13: 32, 9: 32}))
    indent = len(text) - len(text.lstrip())  # leading blanks: Python would call them an indent
    try:
        tree = ast.parse(text[indent:], mode="eval")
    except SyntaxError as exc:
        col = indent + exc.offset if exc.offset else len(expr) + 1
        raise FashionSearchError(_syntax_message(expr, col, exc.msg)) from None
    try:
        return _node(tree.body)
    except _Error as exc:
        col = len(expr) + 1
        if exc.node is not None and hasattr(exc.node, "col_offset"):
            # ast counts UTF-8 bytes; a column is in characters
            col = indent + len(text[indent:].encode()[: exc.node.col_offset].decode(errors="ignore")) + 1
        raise FashionSearchError(
            f"invalid filter expression at column {col}: {exc.message}: {expr}"
        ) from None


def _syntax_message(expr: str, col: int, msg: str) -> str:
    where = "at the end" if col > len(expr) else f"at column {col}"
    if msg.startswith("invalid syntax"):
        rest = expr[col - 1 :]
        near = expr[max(col - 2, 0) : col + 1]
        if rest.startswith("=") and not rest.startswith("=="):
            msg = "use == to compare"
        elif "&&" in near or "||" in near or (rest.startswith("!") and not rest.startswith("!=")):
            msg = "write and / or / not"
        elif col > len(expr):
            msg = "the expression ends too early"
        else:
            msg = f"unexpected {rest.split()[0]!r}" if rest.split() else msg
    return f"invalid filter expression {where}: {msg}: {expr}"


def _lower_keywords(text: str) -> str:
    chars = list(text)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.NAME and tok.string in _UPPER_KEYWORDS:
                start = tok.start[1]
                chars[start : start + len(tok.string)] = _UPPER_KEYWORDS[tok.string]
    except (tokenize.TokenError, SyntaxError, IndentationError):
        pass  # the parser reports the problem, with its position
    return "".join(chars)


def _node(n: ast.AST) -> Node:
    if isinstance(n, ast.BoolOp):
        items = tuple(_node(v) for v in n.values)
        return And(items) if isinstance(n.op, ast.And) else Or(items)
    if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not):
        return Not(_node(n.operand))
    if isinstance(n, ast.Compare):
        operands = [n.left, *n.comparators]
        parts = [_comparison(a, op, b) for a, op, b in zip(operands, n.ops, operands[1:])]
        return parts[0] if len(parts) == 1 else And(tuple(parts))  # 10 < price < 50
    if isinstance(n, ast.Name) and n.id.lower() not in _BOOL_NAMES:
        return Compare(n.id, "==", True)  # a bool attribute alone: `in_stock`
    raise _Error(n, "expected a condition such as price < 50, brand in ['A', 'B'] or in_stock == true")


def _comparison(a: ast.AST, op: ast.cmpop, b: ast.AST) -> Node:
    if isinstance(op, (ast.In, ast.NotIn)):
        if not _is_attribute(a):
            raise _Error(a, "the left side of in must be an attribute name")
        if not isinstance(b, ast.List):
            raise _Error(b, "in takes a list of values in brackets, e.g. brand in ['A', 'B']")
        return In(a.id, tuple(_literal(v) for v in b.elts), isinstance(op, ast.NotIn))
    symbol = _AST_OPS.get(type(op))
    if symbol is None:
        raise _Error(b, f"unsupported operator {type(op).__name__}: use {', '.join(COMPARISONS)}, in, not in")
    if _is_attribute(a) and not _is_attribute(b):
        return Compare(a.id, symbol, _literal(b))
    if _is_attribute(b) and not _is_attribute(a):
        return Compare(b.id, _FLIP[symbol], _literal(a))  # 50 > price is price < 50
    for side in (a, b):
        if not _is_attribute(side):
            _literal(side)  # arithmetic, calls and the like are reported where they stand
    raise _Error(a, "a comparison needs one attribute name and one value")


def _is_attribute(n: ast.AST) -> bool:
    return isinstance(n, ast.Name) and n.id.lower() not in _BOOL_NAMES


def _literal(n: ast.AST) -> Value:
    if isinstance(n, ast.Name) and n.id.lower() in _BOOL_NAMES:
        return _BOOL_NAMES[n.id.lower()]
    if isinstance(n, ast.Constant) and isinstance(n.value, (bool, int, float, str)):
        if isinstance(n.value, float) and not np.isfinite(n.value):
            raise _Error(n, "numbers must be finite")
        return n.value
    if (
        isinstance(n, ast.UnaryOp)
        and isinstance(n.op, (ast.USub, ast.UAdd))
        and isinstance(n.operand, ast.Constant)
        and type(n.operand.value) in (int, float)
    ):
        return -n.operand.value if isinstance(n.op, ast.USub) else n.operand.value
    if isinstance(n, ast.BinOp):
        raise _Error(n, "arithmetic is not supported: compare an attribute with a value")
    raise _Error(n, "expected a value: a number, a quoted string, true or false")


# -- checking ------------------------------------------------------------------------------------------
def _kind_of(value: Value) -> str:
    return "bool" if isinstance(value, bool) else "number" if isinstance(value, (int, float)) else "string"


def literal(value: Value) -> str:
    """A value as Milvus writes it: true/false, numbers as Python prints them, strings double-quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _leaves(node: Node):
    if isinstance(node, (Compare, In)):
        yield node
    elif isinstance(node, Not):
        yield from _leaves(node.item)
    else:
        for item in node.items:
            yield from _leaves(item)


def check(node: Node, schema: dict[str, str]) -> None:
    """Raise FashionSearchError for an unknown attribute (listing the known ones) or a type mismatch."""
    for leaf in _leaves(node):
        kind = schema.get(leaf.attribute)
        if kind is None:
            known = ", ".join(sorted(schema)) or "none"
            raise FashionSearchError(
                f"unknown attribute {leaf.attribute!r} in the filter; known attributes: {known}"
            )
        values = leaf.values if isinstance(leaf, In) else (leaf.value,)
        for v in values:
            if _kind_of(v) != kind:
                what = "but the list holds" if isinstance(leaf, In) else "compared with"
                shown = repr(v) if isinstance(v, str) else literal(v)
                raise FashionSearchError(f"{leaf.attribute} is a {kind}, {what} the {_kind_of(v)} {shown}")
        if kind == "bool" and isinstance(leaf, Compare) and leaf.op not in ("==", "!="):
            raise FashionSearchError(f"{leaf.attribute} is a bool: compare it with == or !=, not {leaf.op}")


# -- evaluating ----------------------------------------------------------------------------------------
def mask(node: Node, store: AttributeStore) -> np.ndarray:
    """Rows of `store` that match, as a bool array.

    Missing values follow SQL's three-valued logic (Milvus's nullable fields say only that a null is
    excluded by the index; SQL is the rule such engines share): a comparison with a missing value is
    unknown, `and`/`or`/`not` combine unknowns as SQL does, and an unknown row does not match. So rows
    without a price match neither `price == 5` nor `price != 5` nor `not (price == 5)`.
    """
    check(node, store.schema())
    yes, _ = _eval(node, store)
    return yes


def _eval(node: Node, store: AttributeStore) -> tuple[np.ndarray, np.ndarray]:
    """(rows where node is true, rows where it is false); the rest are unknown."""
    if isinstance(node, And):
        parts = [_eval(i, store) for i in node.items]
        return np.logical_and.reduce([t for t, _ in parts]), np.logical_or.reduce([f for _, f in parts])
    if isinstance(node, Or):
        parts = [_eval(i, store) for i in node.items]
        return np.logical_or.reduce([t for t, _ in parts]), np.logical_and.reduce([f for _, f in parts])
    if isinstance(node, Not):
        yes, no = _eval(node.item, store)
        return no, yes
    col = store.columns[node.attribute]
    present = ~col.missing()
    hit = _leaf(node, col) & present
    return hit, present & ~hit


def _leaf(node: Compare | In, col: Column) -> np.ndarray:
    data = np.asarray(col.data)
    if isinstance(node, In):
        hit = np.isin(data, [_code(col, v) for v in node.values])
        return ~hit if node.negated else hit
    if col.kind == "string" and node.op not in ("==", "!="):
        # The vocabulary is sorted, so codes order as their strings do: compare codes with a cut point.
        cut = {
            "<": bisect.bisect_left,
            ">=": bisect.bisect_left,
            "<=": bisect.bisect_right,
            ">": bisect.bisect_right,
        }[node.op](col.vocab, node.value)
        return data < cut if node.op in ("<", "<=") else data >= cut
    return _PY_OPS[node.op](data, _code(col, node.value))


def _code(col: Column, value: Value) -> float | int:
    """A value in the column's storage: the number, 0/1, or the string's code (-2: not in the vocabulary,
    which no row has, missing rows being -1)."""
    if col.kind == "string":
        i = bisect.bisect_left(col.vocab, value)
        return i if i < len(col.vocab) and col.vocab[i] == value else -2
    return int(value) if col.kind == "bool" else value


# -- writing -------------------------------------------------------------------------------------------
def to_milvus(node: Node) -> str:
    """The expression in canonical Milvus syntax; parse(to_milvus(t)) == t up to how And/Or nest."""
    if isinstance(node, Compare):
        return f"{node.attribute} {node.op} {literal(node.value)}"
    if isinstance(node, In):
        values = ", ".join(literal(v) for v in node.values)
        return f"{node.attribute} {'not in' if node.negated else 'in'} [{values}]"
    if isinstance(node, Not):
        return f"not ({to_milvus(node.item)})"
    word = " and " if isinstance(node, And) else " or "
    return word.join(_wrapped(i) for i in node.items)


def _wrapped(node: Node) -> str:
    return f"({to_milvus(node)})" if isinstance(node, (And, Or)) else to_milvus(node)


def evaluate_row(node: Node, row: dict[str, Any]) -> bool | None:
    """One row (attribute -> value, missing ones absent or None) by plain Python: True, False or None
    (unknown). The reference the vectorised mask() is tested against; also handy for a few rows."""
    if isinstance(node, And):
        vals = [evaluate_row(i, row) for i in node.items]
        return False if False in vals else None if None in vals else True
    if isinstance(node, Or):
        vals = [evaluate_row(i, row) for i in node.items]
        return True if True in vals else None if None in vals else False
    if isinstance(node, Not):
        v = evaluate_row(node.item, row)
        return None if v is None else not v
    v = row.get(node.attribute)
    if v is None:
        return None
    if isinstance(node, In):
        return (v in node.values) != node.negated
    return bool(_PY_OPS[node.op](v, node.value))
