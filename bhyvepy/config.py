"""The bhyve_config(5) configuration tree.

bhyve keeps every setting -- from ``-o``, ``-k``, the legacy ``-s``/``-l``
syntax and its own defaults -- in one tree of libnv nvlists whose leaves are
strings.  Consumers rely on the exact behaviour of that tree: the order of
``-o config.dump=1`` output, "last writer wins" (a replaced leaf moves to the
end of its node, because libnv removes and re-appends it), the refusal to turn
a leaf into a node or back, ``%(path)`` references expanded on read, and the
error texts.  :class:`ConfigTree` reproduces those rules on nested Python
dicts (insertion ordered like nvlists).

The tree object is passed around explicitly; this module keeps no state.

Messages: bhyve prints ``warnx()`` warnings (non-fatal, prefixed with the
program name) and ends with ``errx()`` (prefixed) or, in places, with plain
``fprintf``/``EPRINTLN`` text (no prefix).  Fatal conditions raise
:class:`~bhyvepy.errors.BhyveExit` (prefixed when printed) or
:class:`PlainBhyveExit` (printed as is); warnings go to the tree's ``warn``
callable.  bhyve's ``err()`` appends ``": " + strerror(errno)`` with an
errno that is meaningless at those call sites; bhyvepy leaves that suffix
out.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Iterator, Mapping, TextIO

from bhyvepy.errors import BhyveExit, ExitStatus, PlainBhyveExit  # noqa: F401 (re-exported)

Warn = Callable[[str], None]
_Data = dict  # one nvlist: name -> str (leaf) | dict (node)

#: libnv refuses names of this length or longer (NV_NAME_MAX).
NV_NAME_MAX = 2048
#: bhyve stops expanding ``%(...)`` references below this depth.
MAX_REFERENCE_DEPTH = 15

LONG_MIN = -(1 << 63)
LONG_MAX = (1 << 63) - 1
ULONG_MAX = (1 << 64) - 1

_C_SPACE = " \t\n\v\f\r"
_TRUE_WORDS = ("true", "on", "yes")
_FALSE_WORDS = ("false", "off", "no")


def _json5_decoder() -> Callable[[str], Any] | None:
    """pyjson5 (PyPI) where available; the pure-Python json5 package otherwise,
    because FreeBSD's ports tree has devel/py-json5 but no pyjson5 port."""
    try:
        import pyjson5
    except ImportError:
        try:
            import json5
        except ImportError:
            return None
        return json5.loads

    def decode(text: str) -> Any:
        try:
            return pyjson5.decode(text)
        except pyjson5.Json5Exception as e:   # not a ValueError subclass everywhere
            raise ValueError(str(e)) from None

    return decode


class ConfigTreeError(ValueError):
    """A serialized tree (snapshot metadata) does not describe a valid tree."""


def program_name(argv0: str | None = None) -> str:
    """What bhyve's ``getprogname()`` would return for this process.

    Installed as ``bhyve`` (a drop-in symlink) messages read ``bhyve: ...``
    like the real thing; run as ``python -m bhyvepy`` they read ``bhyvepy:``.
    """
    if argv0 is None:
        argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    name = os.path.basename(argv0)
    if not name or name.endswith(".py") or name in ("-c", "-m"):
        return "bhyvepy"
    return name


def write_text(stream: TextIO, text: str) -> None:
    """Write text that may carry undecodable argv bytes (surrogate escapes)."""
    try:
        stream.write(text)
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape")
        buf = getattr(stream, "buffer", None)
        if buf is None:
            stream.write(raw.decode("utf-8", "replace"))
            return
        stream.flush()
        buf.write(raw)
        buf.flush()


def stderr_warn(message: str) -> None:
    """Default warning sink: ``warnx(3)`` on the current ``sys.stderr``."""
    write_text(sys.stderr, f"{program_name()}: {message}\n")


# --------------------------------------------------------------------------
# C number parsing.  bhyve parses numbers with strtol/strtoul/sscanf; their
# quirks (leading blanks, signs, 0x/0 prefixes, saturation, truncation to
# int) decide which command lines are accepted, so they are reproduced here.
# --------------------------------------------------------------------------

def _digit_value(ch: str) -> int:
    if "0" <= ch <= "9":
        return ord(ch) - 48
    if "a" <= ch.lower() <= "z":
        return ord(ch.lower()) - 87
    return 99


def c_scan_integer(text: str, pos: int, base: int) -> tuple[int, int, bool] | None:
    """Parse ``[blanks][sign][prefix]digits`` like the C library.

    Returns ``(magnitude_with_sign, end, negative)`` or None when no digit
    was found (then ``end`` would be the start: nothing consumed).
    """
    i = pos
    n = len(text)
    while i < n and text[i] in _C_SPACE:
        i += 1
    negative = False
    if i < n and text[i] in "+-":
        negative = text[i] == "-"
        i += 1
    if base in (0, 16) and i + 1 < n and text[i] == "0" and text[i + 1] in "xX" \
            and i + 2 < n and _digit_value(text[i + 2]) < 16:
        i += 2
        base = 16
    elif base == 0:
        base = 8 if i < n and text[i] == "0" else 10
    start = i
    value = 0
    while i < n and _digit_value(text[i]) < base:
        value = value * base + _digit_value(text[i])
        i += 1
    if i == start:
        return None
    return (-value if negative else value), i, negative


def c_strtol(text: str, base: int = 0) -> tuple[int, int, bool]:
    """``strtol(3)``: returns (value, index after the number, overflowed)."""
    parsed = c_scan_integer(text, 0, base)
    if parsed is None:
        return 0, 0, False
    value, end, _ = parsed
    if value > LONG_MAX:
        return LONG_MAX, end, True
    if value < LONG_MIN:
        return LONG_MIN, end, True
    return value, end, False


def c_strtoul(text: str, base: int = 0) -> tuple[int, int, bool]:
    """``strtoul(3)`` on LP64: negative inputs wrap, overflow saturates."""
    parsed = c_scan_integer(text, 0, base)
    if parsed is None:
        return 0, 0, False
    value, end, negative = parsed
    magnitude = -value if negative else value
    if magnitude > ULONG_MAX:
        return ULONG_MAX, end, True
    return (-magnitude) & ULONG_MAX if negative else magnitude, end, False


def to_c_int(value: int) -> int:
    """Truncate like an assignment of a wider integer to a 32-bit ``int``."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def c_sscanf(text: str, fmt: str) -> list[int]:
    """A ``sscanf(3)`` for formats made of literal characters and ``%d``.

    Returns the converted values; the caller compares the count like bhyve
    compares sscanf's return value.  ``%d`` skips leading blanks, takes an
    optional sign and decimal digits, saturates like ``strtoimax`` and is
    then truncated to ``int``; trailing input is ignored.
    """
    values: list[int] = []
    pos = 0
    i = 0
    while i < len(fmt):
        if fmt.startswith("%d", i):
            parsed = c_scan_integer(text, pos, 10)
            if parsed is None:
                return values
            value, pos, _ = parsed
            value = max(LONG_MIN, min(LONG_MAX, value))
            values.append(to_c_int(value))
            i += 2
            continue
        if pos >= len(text) or text[pos] != fmt[i]:
            return values
        pos += 1
        i += 1
    return values


# --------------------------------------------------------------------------
# The tree.
# --------------------------------------------------------------------------

class ConfigNode:
    """A view on one internal node (nvlist) of a :class:`ConfigTree`.

    The ``*_value`` methods follow bhyve's ``*_config_value_node`` functions:
    names are single components (a ``.`` in a name is an error).
    """

    __slots__ = ("tree", "path", "_data")

    def __init__(self, tree: "ConfigTree", path: str, data: _Data) -> None:
        self.tree = tree
        self.path = path
        self._data = data

    def __repr__(self) -> str:
        return f"<ConfigNode {self.path or '(root)'}>"

    def _child_path(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def set_value(self, name: str, value: str) -> None:
        """``set_config_value_node``: replace or append the leaf ``name``."""
        if "." in name:
            raise BhyveExit(f"Invalid config node name {name}", ExitStatus.ERROR)
        current = self._data.get(name)
        if isinstance(current, dict):
            raise BhyveExit(
                f"Attemping to add value {value} to existing node {name} "
                f"of list {id(self._data):#x}", ExitStatus.ERROR)
        self.tree._store(self._data, name, value)

    def set_bool(self, name: str, value: bool) -> None:
        self.set_value(name, "true" if value else "false")

    def set_value_if_unset(self, name: str, value: str) -> None:
        """``set_config_value_node_if_unset`` (tpm's default version)."""
        if self.get_value(name) is None:
            self.set_value(name, value)

    def get_value(self, name: str, default: str | None = None) -> str | None:
        """``get_config_value_node``: the expanded value of leaf ``name``."""
        if "." in name:
            raise BhyveExit(f"Invalid config node name {name}", ExitStatus.ERROR)
        current = self._data.get(name)
        if isinstance(current, dict):
            self.tree.warn(f"Attempt to fetch value of node {name} of list "
                           f"{id(self._data):#x}")
            return default
        if current is None:
            return default
        return self.tree.expand(current)

    def get_bool(self, name: str, default: bool | None = None) -> bool:
        value = self.get_value(name)
        if value is None:
            if default is None:
                raise BhyveExit(f"Failed to fetch boolean variable {name}",
                                ExitStatus.ERROR)
            return default
        return parse_bool(name, value)

    def find_node(self, relpath: str) -> "ConfigNode | None":
        """``find_relative_config_node``."""
        return self.tree._lookup(self, relpath, create=False)

    def create_node(self, relpath: str) -> "ConfigNode | None":
        """``create_relative_config_node`` (None, with a warning, on conflict)."""
        return self.tree._lookup(self, relpath, create=True)

    def is_node(self, name: str) -> bool:
        return isinstance(self._data.get(name), dict)

    def is_leaf(self, name: str) -> bool:
        return isinstance(self._data.get(name), str)

    def __contains__(self, name: object) -> bool:
        return name in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def __bool__(self) -> bool:
        # A view is a handle, not a container test: an empty node is still
        # a node (bhyve distinguishes NULL from an empty nvlist).
        return True

    def items(self) -> Iterator[tuple[str, "str | ConfigNode"]]:
        """Children in insertion order: raw leaf strings or node views."""
        for name, value in list(self._data.items()):
            if isinstance(value, dict):
                yield name, ConfigNode(self.tree, self._child_path(name), value)
            else:
                yield name, value

    def to_dict(self) -> dict[str, Any]:
        return _copy_tree(self._data)


class ConfigTree:
    """bhyve's configuration tree: nested nodes with string leaves.

    ``warn`` receives the text of bhyve's non-fatal ``warnx()`` diagnostics
    (without program-name prefix); by default they go to ``sys.stderr``.
    """

    def __init__(self, warn: Warn | None = None) -> None:
        self._root: _Data = {}
        self.warn: Warn = warn if warn is not None else stderr_warn

    # -- internals ---------------------------------------------------------

    @staticmethod
    def _store(data: _Data, name: str, value: str) -> None:
        if len(name) >= NV_NAME_MAX:
            # libnv would put the nvlist in an error state; refuse instead.
            raise BhyveExit(f"Invalid config node name {name[:64]}...",
                            ExitStatus.ERROR)
        # libnv frees the old pair and appends a new one: the leaf moves to
        # the end of its node, which is visible in config.dump output.
        data.pop(name, None)
        data[name] = value

    def _lookup(self, start: ConfigNode, path: str,
                create: bool) -> ConfigNode | None:
        """``_lookup_config_node`` with its warnings."""
        data = start._data
        node_path = start.path
        parts = path.split(".")
        for index, name in enumerate(parts):
            if name == "":
                self.warn(f"Invalid configuration node: {path}")
                return None
            child = data.get(name)
            if isinstance(child, dict):
                data = child
            elif child is not None:
                partial = ".".join(parts[: index + 1])
                self.warn(f"Configuration node {path} is a child of existing "
                          f"variable {partial}")
                return None
            elif create:
                if len(name) >= NV_NAME_MAX:
                    self.warn(f"Invalid configuration node: {path}")
                    return None
                new: _Data = {}
                data[name] = new
                data = new
            else:
                return None
            node_path = f"{node_path}.{name}" if node_path else name
        return ConfigNode(self, node_path, data)

    def _split(self, path: str) -> tuple[str | None, str]:
        node_name, dot, name = path.rpartition(".")
        return (node_name if dot else None), name

    # -- path-based interface (set_config_value & co.) ----------------------

    @property
    def root(self) -> ConfigNode:
        return ConfigNode(self, "", self._root)

    def set_value(self, path: str, value: str) -> None:
        """``set_config_value``: a dotted path creates the nodes above it."""
        node_name, name = self._split(path)
        if node_name is None:
            node = self.root
        else:
            found = self._lookup(self.root, node_name, create=True)
            if found is None:
                raise BhyveExit(f"Failed to create configuration node {node_name}",
                                ExitStatus.ERROR)
            node = found
        if node.is_node(name):
            raise BhyveExit(f"Attempting to add value {value} to existing node "
                            f"{path}", ExitStatus.ERROR)
        node.set_value(name, value)

    def set_bool(self, path: str, value: bool) -> None:
        self.set_value(path, "true" if value else "false")

    def set_value_if_unset(self, path: str, value: str) -> None:
        if self.get_value(path) is None:
            self.set_value(path, value)

    def get_raw(self, path: str) -> str | None:
        """``get_raw_config_value``: the stored string, unexpanded."""
        node_name, name = self._split(path)
        if node_name is None:
            data = self._root
        else:
            node = self._lookup(self.root, node_name, create=False)
            if node is None:
                return None
            data = node._data
        value = data.get(name)
        if isinstance(value, dict):
            self.warn(f"Attempting to fetch value of node {path}")
            return None
        return value

    def get_value(self, path: str, default: str | None = None) -> str | None:
        """``get_config_value``: the value with ``%(path)`` references expanded."""
        raw = self.get_raw(path)
        if raw is None:
            return default
        return self.expand(raw)

    def get_bool(self, path: str, default: bool | None = None) -> bool:
        """``get_config_bool`` (default None) / ``get_config_bool_default``."""
        value = self.get_value(path)
        if value is None:
            if default is None:
                raise BhyveExit(f"Failed to fetch boolean variable {path}",
                                ExitStatus.ERROR)
            return default
        return parse_bool(path, value)

    def get_int(self, path: str, default: int | None = None, *,
                minval: int = LONG_MIN, maxval: int = LONG_MAX) -> int:
        """A ``strtol(3)`` integer that must use the whole value.

        Mirrors bhyve's ``parse_int_value`` (used for cpus/cores/...), with
        its message ``Invalid value for <path>: '<value>'``.
        """
        value = self.get_value(path)
        if value is None:
            if default is None:
                raise BhyveExit(f"Failed to fetch integer variable {path}",
                                ExitStatus.ERROR)
            return default
        return parse_int_value(path, value, minval, maxval)

    def find_node(self, path: str) -> ConfigNode | None:
        """``find_config_node``: an existing node, None otherwise (may warn)."""
        return self._lookup(self.root, path, create=False)

    def create_node(self, path: str) -> ConfigNode | None:
        """``create_config_node``: None (with a warning) if a leaf is in the way."""
        return self._lookup(self.root, path, create=True)

    def node(self, path: str) -> ConfigNode | None:
        """The node at ``path`` or None, silently (no bhyve warnings)."""
        data: Any = self._root
        if path == "":
            return self.root
        for name in path.split("."):
            if not isinstance(data, dict):
                return None
            data = data.get(name)
        return ConfigNode(self, path, data) if isinstance(data, dict) else None

    def exists(self, path: str) -> bool:
        """Whether a leaf or node exists at ``path`` (silently)."""
        data: Any = self._root
        for name in path.split("."):
            if not isinstance(data, dict) or name not in data:
                return False
            data = data[name]
        return True

    # -- expansion ------------------------------------------------------------

    def expand(self, value: str) -> str:
        """``expand_config_value``: only values containing ``%`` are rewritten."""
        if "%" not in value:
            return value
        return self._expand(value, 0)

    def _expand(self, value: str, depth: int) -> str:
        out: list[str] = []
        i = 0
        n = len(value)
        while i < n:
            ch = value[i]
            if ch == "%":
                if depth > MAX_REFERENCE_DEPTH:
                    self.warn("Too many recursive references in configuration value")
                    out.append("%")
                    i += 1
                    continue
                close = -1
                if i + 2 < n and value[i + 1] == "(":
                    close = value.find(")", i + 2)
                if close < 0:
                    self.warn(f'Invalid reference in configuration value "{value}"')
                    out.append("%")
                    i += 1
                    continue
                i += 2
                if close == i:
                    self.warn(f'Empty reference in configuration value "{value}"')
                    i += 1
                    continue
                ref = value[i:close]
                i = close + 1
                target = self.get_raw(ref)
                if target is None:
                    self.warn(f"Failed to fetch referenced configuration variable {ref}")
                else:
                    out.append(self._expand(target, depth + 1))
            elif ch == "\\":
                i += 1
                if i >= n:
                    self.warn(f'Trailing \\ in configuration value "{value}"')
                    break
                out.append(value[i])
                i += 1
            else:
                out.append(ch)
                i += 1
        return "".join(out)

    # -- whole-tree views -------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[str, str]]:
        """Leaves as (dotted path, raw value), in ``config.dump`` order."""
        return _walk("", self._root)

    def leaves(self) -> list[tuple[str, str]]:
        return list(_walk("", self._root))

    def dump(self) -> str:
        """Exactly what ``-o config.dump=1`` prints (raw, unexpanded values)."""
        return "".join(f"{path}={value}\n" for path, value in _walk("", self._root))

    def to_dict(self) -> dict[str, Any]:
        """A nested, order-preserving copy (for snapshot metadata)."""
        return _copy_tree(self._root)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], warn: Warn | None = None) -> "ConfigTree":
        """Rebuild a tree from :meth:`to_dict` output; untrusted input is checked."""
        tree = cls(warn)
        tree._root = _validated_copy(data, "", 0)
        return tree

    def copy(self) -> "ConfigTree":
        clone = ConfigTree(self.warn)
        clone._root = _copy_tree(self._root)
        return clone

    # -- files (-k) -----------------------------------------------------------------

    def apply_option(self, option: str) -> bool:
        """``bhyve_parse_config_option``: ``var=value`` with a non-empty value."""
        path, eq, value = option.partition("=")
        if not eq or value == "":
            return False
        self.set_value(path, value)
        return True

    def load_file(self, path: str) -> None:
        """``-k``: a flat ``key=value`` file, or (bhyvepy extension) JSON5.

        A file is read as JSON5 when its name ends in ``.json``/``.json5``
        (case-insensitive), or when its first non-blank character is ``{``
        and it parses as JSON5 -- otherwise it is a bhyve flat file, so every
        file the real bhyve accepts means the same here.
        """
        data = _read_config_file(path)
        lower = path.lower()
        if lower.endswith((".json", ".json5")):
            self._load_json5(path, data, strict=True)
            return
        if data.lstrip(b" \t\r\n\v\f\xef\xbb\xbf").startswith(b"{"):
            if self._load_json5(path, data, strict=False):
                return
        self._load_kv(path, data)

    def load_kv_file(self, path: str) -> None:
        """bhyve's ``bhyve_parse_simple_config_file``."""
        self._load_kv(path, _read_config_file(path))

    def load_json5_file(self, path: str) -> None:
        self._load_json5(path, _read_config_file(path), strict=True)

    def _load_kv(self, path: str, data: bytes) -> None:
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for lineno, raw in enumerate(lines, start=1):
            if raw.startswith(b"#") or raw == b"":
                continue
            # getline() keeps bytes after a NUL, but C string handling stops there.
            raw = raw.split(b"\0", 1)[0]
            line = raw.decode("utf-8", "surrogateescape")
            if not self.apply_option(line):
                raise BhyveExit(f"{path} line {lineno}: invalid config option '{line}'",
                                ExitStatus.ERROR)

    def _load_json5(self, path: str, data: bytes, strict: bool) -> bool:
        decode = _json5_decoder()
        if decode is None:
            if not strict:
                return False
            raise BhyveExit(f"{path}: reading JSON5 needs the pyjson5 (or json5) package",
                            ExitStatus.ERROR) from None
        try:
            text = data.decode("utf-8-sig")
            document = decode(text)
        except (UnicodeDecodeError, RecursionError, ValueError, TypeError) as exc:
            if not strict:
                return False
            raise BhyveExit(f"{path}: invalid JSON5 configuration: {_short(exc)}",
                            ExitStatus.ERROR) from None
        if not isinstance(document, dict):
            if not strict:
                return False
            raise BhyveExit(f"{path}: invalid JSON5 configuration: the top level "
                            "must be an object", ExitStatus.ERROR)
        self._apply_json5(path, document, [])
        return True

    def _apply_json5(self, path: str, obj: Mapping[str, Any], prefix: list[str]) -> None:
        for key, value in obj.items():
            keys = prefix + [str(key)]
            dotted = ".".join(keys)
            if isinstance(value, dict):
                if not value:
                    if self.create_node(dotted) is None:
                        raise BhyveExit(f"Failed to create configuration node {dotted}",
                                        ExitStatus.ERROR)
                self._apply_json5(path, value, keys)
            elif isinstance(value, bool):
                self.set_value(dotted, "true" if value else "false")
            elif isinstance(value, int):
                self.set_value(dotted, str(value))
            elif isinstance(value, str):
                self.set_value(dotted, value)
            else:
                raise BhyveExit(f"{path}: invalid value for {dotted}: expected a "
                                "string, integer, boolean or object", ExitStatus.ERROR)


def parse_bool(name: str, value: str) -> bool:
    """bhyve's ``_bool_value``: case-insensitive words, exact ``1``/``0``."""
    lower = value.lower() if value.isascii() else value
    if lower in _TRUE_WORDS or value == "1":
        return True
    if lower in _FALSE_WORDS or value == "0":
        return False
    raise BhyveExit(f"Invalid value {value} for boolean variable {name}",
                    ExitStatus.ERROR)


def parse_int_value(key: str, value: str, minval: int, maxval: int) -> int:
    """bhyve's ``parse_int_value``: whole-string ``strtol``, range checked."""
    number, end, overflow = c_strtol(value, 0)
    if overflow or end == 0 or end != len(value) or not minval <= number <= maxval:
        raise BhyveExit(f"Invalid value for {key}: '{value}'", ExitStatus.ERROR)
    return number


def _walk(prefix: str, data: _Data) -> Iterator[tuple[str, str]]:
    for name, value in list(data.items()):
        if isinstance(value, dict):
            yield from _walk(f"{prefix}{name}.", value)
        else:
            yield f"{prefix}{name}", value


def _copy_tree(data: _Data) -> dict[str, Any]:
    return {name: (_copy_tree(value) if isinstance(value, dict) else value)
            for name, value in data.items()}


def _validated_copy(data: Any, where: str, depth: int) -> _Data:
    if depth > 64:
        raise ConfigTreeError(f"configuration tree nested too deeply at {where or '(root)'}")
    if not isinstance(data, Mapping):
        raise ConfigTreeError(f"configuration node {where or '(root)'} is not an object")
    out: _Data = {}
    for name, value in data.items():
        if not isinstance(name, str):
            raise ConfigTreeError(f"configuration name {name!r} under "
                                  f"{where or '(root)'} is not a string")
        path = f"{where}.{name}" if where else name
        if "." in name or len(name) >= NV_NAME_MAX:
            raise ConfigTreeError(f"invalid configuration name {name[:64]!r} under "
                                  f"{where or '(root)'}")
        if isinstance(value, str):
            out[name] = value
        elif isinstance(value, Mapping):
            if name == "":
                raise ConfigTreeError(f"empty node name under {where or '(root)'}")
            out[name] = _validated_copy(value, path, depth + 1)
        else:
            raise ConfigTreeError(f"configuration value {path} is neither a string "
                                  "nor a node")
    return out


def _read_config_file(path: str) -> bytes:
    try:
        if os.path.isdir(path):
            # fopen() succeeds on a directory and getline() then fails at
            # once: bhyve silently reads nothing.
            return b""
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise BhyveExit(f"Failed to open configuration file {path}: {reason}",
                        ExitStatus.ERROR) from None
    except ValueError:  # embedded NUL in the path
        raise BhyveExit(f"Failed to open configuration file {path}: "
                        "Invalid argument", ExitStatus.ERROR) from None


def _short(exc: BaseException) -> str:
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], str):
        return args[0]
    return type(exc).__name__
