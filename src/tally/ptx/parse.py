"""PTX reader and writer.

A `Module` keeps the exact source text; everything else is an index into it
(offsets of top-level items, of each entry's header and body). Writing an
untouched module therefore returns the input byte for byte, and a transformed
module is the original text with new text inserted at known offsets.

Parsing is two-level so that a multi-megabyte module (Triton output with debug
sections) parses fast: the module level only finds item boundaries with one
C-level regex scan; an entry's body is split into statements only when an
analysis or transformation asks for it (`Function.statements()`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from tally.errors import TallyError

# One scan finds everything that matters for structure: comments and strings
# (skipped, they may contain braces or semicolons), braces and semicolons.
# Line directives (.version, .target, .address_size, .file, .loc) have no ';'
# and end at the end of their line.
_STRUCTURE = re.compile(
    r'(?m:^[ \t]*\.(?:version|target|address_size|file|loc)\b[^\n]*)'
    r'|//[^\n]*|/\*.*?\*/|"(?:[^"\\\n]|\\.)*"|[{};]',
    re.S,
)
_LABEL = re.compile(r"\s*([A-Za-z_$%][\w$]*)\s*:(?!:)")
_PREDICATE = re.compile(r"\s*@(!?)(%?[A-Za-z_$][\w$]*)\s+")
_OPCODE = re.compile(r"\s*([A-Za-z_][\w.:]*)")
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_HEADER_KIND = re.compile(r"(?<![\w.])\.(entry|func)\b")
_NAME = re.compile(r"\s*([A-Za-z_$%][\w$]*)")
_VERSION = re.compile(r"^\s*\.version\s+(\d+)\.(\d+)", re.M)
_TARGET = re.compile(r"^\s*\.target\s+([^\n;/]+)", re.M)
_ADDRESS_SIZE = re.compile(r"^\s*\.address_size\s+(\d+)", re.M)


def strip_comments(text: str) -> str:
    return _COMMENT.sub(" ", text)


@dataclass
class Statement:
    """One statement of a function body.

    `kind` is "instruction", "directive" (.reg, .shared, .loc, ...), "label",
    "open" or "close" (a nested `{ }` scope). `start`/`end` are offsets into
    the module text; `end` is just past the `;` (or the brace, or the colon).
    """

    kind: str
    start: int
    end: int
    text: str
    label: str = ""
    predicate: str = ""  # e.g. "%p1" or "!%p1", empty when unpredicated
    opcode: str = ""  # full opcode with modifiers, e.g. "ld.global.v4.f32"
    operands: str = ""  # the operand text, comments removed

    @property
    def root(self) -> str:
        """The instruction name without modifiers (`ld` for `ld.global.f32`)."""
        return self.opcode.split(".", 1)[0]

    @property
    def modifiers(self) -> list[str]:
        return self.opcode.split(".")[1:]

    def operand_list(self) -> list[str]:
        return split_operands(self.operands)


def split_operands(text: str) -> list[str]:
    """Split an operand list at top-level commas ({...}, [...], (...) nest)."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    tail = "".join(current).strip()
    if tail or parts:
        parts.append(tail)
    return parts


@dataclass
class Param:
    name: str
    text: str  # the declaration as written, e.g. ".param .u64 .ptr .global .align 1 add_param_0"

    @property
    def state_space_type(self) -> str:
        """The declared type (".u64", ".b8", ...), for host-side argument packing."""
        for token in self.text.split():
            if token.startswith(".") and token[1:2] in "ubsf" and token[1:].rstrip("0123456789") in ("u", "b", "s", "f"):
                return token
        return ""


@dataclass
class Function:
    """A `.entry` or `.func` with its header parsed and its body indexed lazily."""

    module: "Module"
    kind: str  # "entry" or "func"
    name: str
    start: int  # offset of the item (first linkage directive or .entry)
    name_start: int
    params_open: int  # offset of "(" of the parameter list, -1 if none
    params_close: int  # offset of ")" of the parameter list, -1 if none
    body_open: int  # offset of "{", -1 for a declaration without body
    end: int  # offset just past the closing "}" (or ";")
    params: list[Param] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.module.text[self.start : self.end]

    @property
    def has_body(self) -> bool:
        return self.body_open >= 0

    @property
    def header_text(self) -> str:
        return self.module.text[self.start : self.body_open if self.has_body else self.end]

    @cached_property
    def directives(self) -> dict[str, str]:
        """Performance directives between the parameter list and the body
        (.maxntid, .reqntid, .minnctapersm, .maxnreg, .reqnctapercluster, ...)."""
        after = self.params_close + 1 if self.params_close >= 0 else self.name_start + len(self.name)
        stop = self.body_open if self.has_body else self.end
        text = strip_comments(self.module.text[after:stop])
        found: dict[str, str] = {}
        for match in re.finditer(r"\.(\w+)([^.]*)", text):
            found[match.group(1)] = match.group(2).strip().rstrip(";").strip()
        return found

    @cached_property
    def statements(self) -> list[Statement]:
        if not self.has_body:
            return []
        return parse_body(self.module.text, self.body_open + 1, self.end - 1)


@dataclass
class Item:
    """A top-level item: a directive, a variable, a function, a section."""

    kind: str  # "version", "target", "address_size", "entry", "func", "section", "other"
    start: int
    end: int


class Module:
    """A PTX module. `str(module)` is the exact source text."""

    def __init__(self, text: str):
        self.text = text
        self.items: list[Item] = []
        self.functions: list[Function] = []
        self._scan()

    def __str__(self) -> str:
        return self.text

    # -- header facts ------------------------------------------------------------
    @cached_property
    def version(self) -> tuple[int, int]:
        match = _VERSION.search(self.text)
        return (int(match.group(1)), int(match.group(2))) if match else (0, 0)

    @cached_property
    def target(self) -> str:
        match = _TARGET.search(self.text)
        return match.group(1).strip() if match else ""

    @cached_property
    def address_size(self) -> int:
        match = _ADDRESS_SIZE.search(self.text)
        return int(match.group(1)) if match else 32  # the PTX default

    @property
    def entries(self) -> list[Function]:
        return [f for f in self.functions if f.kind == "entry" and f.has_body]

    def entry(self, name: str) -> Function:
        for function in self.entries:
            if function.name == name:
                return function
        known = ", ".join(f.name for f in self.entries) or "none"
        raise TallyError(f"no entry named {name!r} in this module (entries: {known})")

    def function(self, name: str) -> Function | None:
        """The definition of `name` if the module has one, else its declaration, else None."""
        declared = None
        for function in self.functions:
            if function.name == name:
                if function.has_body:
                    return function
                declared = function
        return declared

    def with_insertions(self, insertions: list[tuple[int, str]]) -> str:
        """The module text with `text` inserted at each `offset` (stable for equal offsets)."""
        pieces, last = [], 0
        for offset, text in sorted(insertions, key=lambda pair: pair[0]):
            pieces.append(self.text[last:offset])
            pieces.append(text)
            last = offset
        pieces.append(self.text[last:])
        return "".join(pieces)

    # -- scanning ----------------------------------------------------------------
    def _scan(self) -> None:
        text = self.text
        depth = 0
        item_start = None  # offset of the first significant char of the current item
        last = 0
        for match in _STRUCTURE.finditer(text):
            token = match.group()
            if item_start is None and text[last : match.start()].strip():
                item_start = last + (len(text[last : match.start()]) - len(text[last : match.start()].lstrip()))
            last = match.end()
            first = token.lstrip()[0]
            if first == "." :
                if depth == 0:
                    if item_start is not None and item_start < match.start() and _significant(text, item_start, match.start()):
                        raise TallyError(f"not PTX: unterminated statement before line {text.count(chr(10), 0, match.start()) + 1}")
                    self._add_item(match.start() + len(token) - len(token.lstrip()), match.end())
                    item_start = None
                continue
            if first == "/" and len(token) > 1 and token[1] in "/*" or first == '"':
                if first == '"' and item_start is None:
                    item_start = match.start()
                continue
            if item_start is None:
                item_start = match.start()
            if token == "{":
                depth += 1
            elif token == "}":
                depth -= 1
                if depth < 0:
                    raise TallyError(f"not PTX: unbalanced '}}' at line {text.count(chr(10), 0, match.start()) + 1}")
                if depth == 0 and self._braced_item(item_start, match.start()):
                    self._add_item(item_start, match.end())
                    item_start = None
            elif token == ";" and depth == 0:
                self._add_item(item_start, match.end())
                item_start = None
        if depth != 0:
            raise TallyError("not PTX: unbalanced '{' (truncated file?)")
        if item_start is not None and text[item_start:].strip():
            raise TallyError(f"not PTX: trailing text at line {text.count(chr(10), 0, item_start) + 1}")
        if not any(item.kind == "version" for item in self.items) and not self.functions:
            raise TallyError("not PTX: no .version directive and no functions")

    def _braced_item(self, start: int, brace_close: int) -> bool:
        """Whether a top-level item ends at its closing brace (a function or a
        section) rather than at a later ';' (a variable with an initializer)."""
        brace = _first_brace(self.text, start, brace_close)
        head = strip_comments(self.text[start:brace]).lstrip()
        return head.startswith(".section") or bool(_HEADER_KIND.search(head))

    def _add_item(self, start: int, end: int) -> None:
        text = self.text
        head = strip_comments(text[start : min(end, start + 4096)])
        stripped = head.lstrip()
        kind = "other"
        for directive in ("version", "target", "address_size", "section"):
            if stripped.startswith("." + directive):
                kind = directive
                break
        brace = _first_brace(text, start, end)
        header_end = brace if brace >= 0 else end
        kind_match = _HEADER_KIND.search(strip_comments(text[start:header_end]))
        if kind == "other" and kind_match and "(" not in strip_comments(text[start:header_end])[: kind_match.start()]:
            kind = kind_match.group(1)
            self.functions.append(self._parse_function(kind, start, end, brace))
        self.items.append(Item(kind, start, end))

    def _parse_function(self, kind: str, start: int, end: int, brace: int) -> Function:
        text = self.text
        header_end = brace if brace >= 0 else end
        header = text[start:header_end]
        clean = strip_comments(header)  # same length? no: comments become one space
        if len(clean) != len(header):
            # Map offsets through a comment-blanking that keeps lengths.
            clean = _COMMENT.sub(lambda m: " " * len(m.group()), header)
        kind_match = _HEADER_KIND.search(clean)
        position = kind_match.end()
        # A .func may declare return values before its name: .func (.param .b32 r) name (...)
        rest = clean[position:]
        skip = len(rest) - len(rest.lstrip())
        if kind == "func" and rest.lstrip().startswith("("):
            close = _matching_paren(clean, position + skip)
            position = close + 1
        name_match = _NAME.match(clean, position)
        if not name_match:
            raise TallyError(f"not PTX: .{kind} without a name at line {text.count(chr(10), 0, start) + 1}")
        name = name_match.group(1)
        name_start = start + name_match.start(1)
        params_open = params_close = -1
        after_name = clean[name_match.end() :]
        if after_name.lstrip().startswith("("):
            open_rel = name_match.end() + (len(after_name) - len(after_name.lstrip()))
            close_rel = _matching_paren(clean, open_rel)
            params_open, params_close = start + open_rel, start + close_rel
        params: list[Param] = []
        if params_open >= 0:
            inner = clean[params_open - start + 1 : params_close - start]
            for declaration in split_operands(inner):
                declaration = " ".join(declaration.split())
                if not declaration:
                    continue
                name_token = re.search(r"([A-Za-z_$%][\w$]*)\s*(\[[^\]]*\])?\s*$", declaration)
                params.append(Param(name_token.group(1) if name_token else declaration, declaration))
        body_end = end if brace >= 0 else end
        return Function(self, kind, name, start, name_start, params_open, params_close, brace, body_end, params)


def _first_brace(text: str, start: int, end: int) -> int:
    """Offset of the first '{' in text[start:end] outside comments and strings, or -1."""
    for match in _STRUCTURE.finditer(text, start, end):
        if match.group() == "{":
            return match.start()
    return -1


def _matching_paren(text: str, open_index: int) -> int:
    depth = 0
    for index in range(open_index, len(text)):
        if text[index] == "(":
            depth += 1
        elif text[index] == ")":
            depth -= 1
            if depth == 0:
                return index
    raise TallyError("not PTX: unbalanced '(' in a function header")


def parse_body(text: str, start: int, end: int) -> list[Statement]:
    """Split text[start:end] (a function body without its outer braces) into statements.

    A `{` that begins a statement opens a nested scope; one inside an
    instruction is a vector operand (`{%r1, %r2}`) and stays in the instruction.
    """
    statements: list[Statement] = []
    segment_start = start  # where the text of the statement being collected starts
    vector_depth = 0
    for match in _STRUCTURE.finditer(text, start, end):
        token = match.group()
        if token.lstrip()[:1] == ".":
            if vector_depth:
                raise TallyError(f"not PTX: directive inside an instruction at line {text.count(chr(10), 0, match.start()) + 1}")
            segment_start = _flush_labels(text, segment_start, match.start(), statements)
            if _significant(text, segment_start, match.start()):
                raise TallyError(f"not PTX: unterminated statement before line {text.count(chr(10), 0, match.start()) + 1}")
            statements.append(_statement(text, match.start(), match.end(), terminated=False))
            segment_start = match.end()
            continue
        if token[0] in '/"' and (len(token) > 1 and token[1] in "/*" or token[0] == '"'):
            continue
        if token == "{":
            if vector_depth == 0 and not _significant(text, segment_start, match.start()):
                _flush_labels(text, segment_start, match.start(), statements)
                statements.append(Statement("open", match.start(), match.end(), "{"))
                segment_start = match.end()
            elif vector_depth == 0 and _only_labels(text, segment_start, match.start()):
                _flush_labels(text, segment_start, match.start(), statements)
                statements.append(Statement("open", match.start(), match.end(), "{"))
                segment_start = match.end()
            else:
                vector_depth += 1
        elif token == "}":
            if vector_depth > 0:
                vector_depth -= 1
            else:
                if _significant(text, segment_start, match.start()) and not _only_labels(text, segment_start, match.start()):
                    raise TallyError(
                        f"not PTX: statement without ';' before '}}' at line {text.count(chr(10), 0, match.start()) + 1}"
                    )
                _flush_labels(text, segment_start, match.start(), statements)
                statements.append(Statement("close", match.start(), match.end(), "}"))
                segment_start = match.end()
        else:  # ";"
            if vector_depth:
                raise TallyError(f"not PTX: unbalanced '{{' at line {text.count(chr(10), 0, match.start()) + 1}")
            segment_start = _flush_labels(text, segment_start, match.start(), statements)
            statements.append(_statement(text, segment_start, match.end()))
            segment_start = match.end()
    _flush_labels(text, segment_start, end, statements)
    return statements


def _significant(text: str, start: int, end: int) -> bool:
    return bool(strip_comments(text[start:end]).strip())


def _only_labels(text: str, start: int, end: int) -> bool:
    clean = _COMMENT.sub(lambda m: " " * len(m.group()), text[start:end])
    position = 0
    while True:
        match = _LABEL.match(clean, position)
        if not match:
            return not clean[position:].strip()
        position = match.end()


def _flush_labels(text: str, start: int, end: int, statements: list[Statement]) -> int:
    """Emit the labels at the beginning of text[start:end]; return where the rest begins."""
    clean = _COMMENT.sub(lambda m: " " * len(m.group()), text[start:end])
    position = 0
    while True:
        match = _LABEL.match(clean, position)
        if not match:
            break
        statements.append(Statement("label", start + match.start(1), start + match.end(), match.group(1) + ":", label=match.group(1)))
        position = match.end()
    return start + position


_LEADING_TRIVIA = re.compile(r"(?:\s+|//[^\n]*|/\*.*?\*/)*", re.S)


def _statement(text: str, start: int, end: int, terminated: bool = True) -> Statement:
    start = _LEADING_TRIVIA.match(text, start, end).end()
    raw = text[start:end]
    clean = " ".join(strip_comments(raw[:-1] if terminated else raw).split())
    if clean.startswith("."):
        return Statement("directive", start, end, raw, opcode=clean.split(" ", 1)[0], operands=clean.partition(" ")[2])
    predicate = ""
    position = 0
    match = _PREDICATE.match(clean)
    if match:
        predicate = match.group(1) + match.group(2)
        position = match.end()
    opcode_match = _OPCODE.match(clean, position)
    if not opcode_match:
        raise TallyError(f"not PTX: cannot read statement {clean[:60]!r} at line {text.count(chr(10), 0, start) + 1}")
    operands = clean[opcode_match.end() :].strip()
    return Statement("instruction", start, end, raw, predicate=predicate, opcode=opcode_match.group(1), operands=operands)


def parse(text: str) -> Module:
    """Parse PTX source text into a Module (raises TallyError for text that is not PTX)."""
    return Module(text)


def read_module(path: str | Path) -> Module:
    """Read and parse a PTX file; errors are one-line TallyErrors."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TallyError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TallyError(f"{path} is not PTX: not UTF-8 text") from None
    try:
        return parse(text)
    except TallyError as exc:
        raise TallyError(f"{path}: {exc}") from None
