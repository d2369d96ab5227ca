"""Declarative, versioned device state (the QEMU VMState idea, in dataclasses).

A device's state is a plain dataclass whose fields carry their wire type in
``typing.Annotated`` metadata::

    @device_state("uart", version=1)
    @dataclass
    class UartState:
        ier: U8 = 0
        rx_fifo: Annotated[bytes, Blob(max_len=16)] = b""
        scratch: Annotated[int, UInt(1, since=2)] = 0   # added in version 2

From that single declaration come the encoder, the validating decoder, a
schema description for ``bhyvepyctl`` and hypothesis strategies for the
round-trip tests.  Decoding treats its input as hostile: every length is
bounded, every integer range-checked, and a ``validate()`` method on the
class (if any) runs before the object is handed to a device.
"""

from __future__ import annotations

import dataclasses
import struct
import typing
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")


class StateError(ValueError):
    """Encoded state is malformed or fails validation."""


# ----------------------------------------------------------------------------
# field kinds
# ----------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Kind:
    since: int = 1

    def encode(self, v: Any, out: bytearray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, buf: memoryview, pos: int, version: int) -> tuple[Any, int]:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover
        raise NotImplementedError


def _need(buf: memoryview, pos: int, n: int) -> None:
    if n < 0 or pos + n > len(buf):
        raise StateError("state record truncated")


@dataclass(frozen=True, kw_only=True)
class UInt(Kind):
    size: int = 4
    signed: bool = False

    def __init__(self, size: int, since: int = 1, signed: bool = False) -> None:
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "since", since)
        object.__setattr__(self, "signed", signed)

    def check(self, v: Any) -> None:
        if not isinstance(v, int) or isinstance(v, bool):
            raise StateError(f"expected an integer, got {type(v).__name__}")
        bits = 8 * self.size
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if self.signed else (0, (1 << bits) - 1)
        if not lo <= v <= hi:
            raise StateError(f"integer {v} out of range for {self.describe()}")

    def encode(self, v: Any, out: bytearray) -> None:
        self.check(v)
        out += v.to_bytes(self.size, "little", signed=self.signed)

    def decode(self, buf: memoryview, pos: int, version: int) -> tuple[Any, int]:
        _need(buf, pos, self.size)
        return int.from_bytes(buf[pos:pos + self.size], "little", signed=self.signed), pos + self.size

    def describe(self) -> str:
        return f"{'i' if self.signed else 'u'}{8 * self.size}"


@dataclass(frozen=True, kw_only=True)
class Bool(Kind):
    def encode(self, v: Any, out: bytearray) -> None:
        if not isinstance(v, bool):
            raise StateError(f"expected a bool, got {type(v).__name__}")
        out.append(1 if v else 0)

    def decode(self, buf: memoryview, pos: int, version: int) -> tuple[Any, int]:
        _need(buf, pos, 1)
        b = buf[pos]
        if b > 1:
            raise StateError(f"bad boolean byte {b}")
        return bool(b), pos + 1

    def describe(self) -> str:
        return "bool"


_LEN = struct.Struct("<I")


@dataclass(frozen=True, kw_only=True)
class Blob(Kind):
    """Variable-length bytes, at most ``max_len``; ``exact`` forces a length."""

    max_len: int = 4096
    exact: int | None = None

    def encode(self, v: Any, out: bytearray) -> None:
        if not isinstance(v, (bytes, bytearray)):
            raise StateError(f"expected bytes, got {type(v).__name__}")
        self._check_len(len(v))
        out += _LEN.pack(len(v))
        out += v

    def _check_len(self, n: int) -> None:
        if self.exact is not None and n != self.exact:
            raise StateError(f"blob of {n} bytes, expected exactly {self.exact}")
        if n > self.max_len:
            raise StateError(f"blob of {n} bytes exceeds limit {self.max_len}")

    def decode(self, buf: memoryview, pos: int, version: int) -> tuple[Any, int]:
        _need(buf, pos, 4)
        (n,) = _LEN.unpack_from(buf, pos)
        pos += 4
        self._check_len(n)
        _need(buf, pos, n)
        return bytes(buf[pos:pos + n]), pos + n

    def describe(self) -> str:
        return f"bytes[{self.exact}]" if self.exact is not None else f"bytes[<={self.max_len}]"


@dataclass(frozen=True, kw_only=True)
class Str(Kind):
    max_len: int = 1024

    def encode(self, v: Any, out: bytearray) -> None:
        if not isinstance(v, str):
            raise StateError(f"expected a string, got {type(v).__name__}")
        Blob(max_len=self.max_len).encode(v.encode(), out)

    def decode(self, buf: memoryview, pos: int, version: int) -> tuple[Any, int]:
        raw, pos = Blob(max_len=self.max_len).decode(buf, pos, version)
        try:
            return raw.decode(), pos
        except UnicodeDecodeError as e:
            raise StateError(f"string is not UTF-8: {e}") from None

    def describe(self) -> str:
        return f"str[<={self.max_len}]"


@dataclass(frozen=True, kw_only=True)
class Nested(Kind):
    cls: type = object

    def encode(self, v: Any, out: bytearray) -> None:
        if not isinstance(v, self.cls):
            raise StateError(f"expected {self.cls.__name__}, got {type(v).__name__}")
        _encode_fields(v, out)

    def decode(self, buf: memoryview, pos: int, version: int) -> tuple[Any, int]:
        return _decode_fields(self.cls, buf, pos, _spec(self.cls).version)

    def describe(self) -> str:
        return self.cls.__name__


@dataclass(frozen=True, kw_only=True)
class ListOf(Kind):
    item: Kind = dataclasses.field(default_factory=lambda: UInt(4))
    max_len: int = 256
    exact: int | None = None

    def __init__(self, item: Kind, *, max_len: int = 256, exact: int | None = None, since: int = 1) -> None:
        object.__setattr__(self, "item", item)
        object.__setattr__(self, "max_len", max_len)
        object.__setattr__(self, "exact", exact)
        object.__setattr__(self, "since", since)

    def encode(self, v: Any, out: bytearray) -> None:
        if not isinstance(v, (list, tuple)):
            raise StateError(f"expected a list, got {type(v).__name__}")
        self._check_len(len(v))
        out += _LEN.pack(len(v))
        for x in v:
            self.item.encode(x, out)

    def _check_len(self, n: int) -> None:
        if self.exact is not None and n != self.exact:
            raise StateError(f"list of {n} items, expected exactly {self.exact}")
        if n > self.max_len:
            raise StateError(f"list of {n} items exceeds limit {self.max_len}")

    def decode(self, buf: memoryview, pos: int, version: int) -> tuple[Any, int]:
        _need(buf, pos, 4)
        (n,) = _LEN.unpack_from(buf, pos)
        pos += 4
        self._check_len(n)
        items = []
        for _ in range(n):
            x, pos = self.item.decode(buf, pos, version)
            items.append(x)
        return items, pos

    def describe(self) -> str:
        return f"list[{self.item.describe()}]"


# Handy aliases for annotations.
U8 = Annotated[int, UInt(1)]
U16 = Annotated[int, UInt(2)]
U32 = Annotated[int, UInt(4)]
U64 = Annotated[int, UInt(8)]
I64 = Annotated[int, UInt(8, signed=True)]
BOOL = Annotated[bool, Bool()]


# ----------------------------------------------------------------------------
# specs
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: Kind


@dataclass(frozen=True)
class StateSpec:
    name: str
    version: int
    min_version: int
    fields: tuple[FieldSpec, ...]

    def describe(self) -> list[tuple[str, str, int]]:
        return [(f.name, f.kind.describe(), f.kind.since) for f in self.fields]


_HEADER = struct.Struct("<HH")   # version, reserved


def _kind_for(hint: Any) -> Kind:
    if get_origin(hint) is Annotated:
        base, *meta = get_args(hint)
        for m in meta:
            if isinstance(m, Kind):
                return m
        hint = base
    if dataclasses.is_dataclass(hint) and hasattr(hint, "__state_spec__"):
        return Nested(cls=hint)
    if hint is bool:
        return Bool()
    raise TypeError(f"state field type {hint!r} has no wire kind; annotate it")


def device_state(name: str, version: int = 1, min_version: int = 1):
    """Class decorator: compile a dataclass's annotations into a :class:`StateSpec`."""

    def deco(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        hints = get_type_hints(cls, include_extras=True)
        fields = tuple(FieldSpec(f.name, _kind_for(hints[f.name])) for f in dataclasses.fields(cls))
        for f in fields:
            if f.kind.since > version:
                raise TypeError(f"{cls.__name__}.{f.name}: since={f.kind.since} > version {version}")
        cls.__state_spec__ = StateSpec(name, version, min_version, fields)  # type: ignore[attr-defined]
        return cls

    return deco


def _spec(cls: type) -> StateSpec:
    try:
        return cls.__state_spec__  # type: ignore[attr-defined]
    except AttributeError:
        raise TypeError(f"{cls.__name__} is not a @device_state class") from None


def spec_of(obj_or_cls: Any) -> StateSpec:
    return _spec(obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls))


def _encode_fields(obj: Any, out: bytearray) -> None:
    for f in _spec(type(obj)).fields:
        try:
            f.kind.encode(getattr(obj, f.name), out)
        except StateError as e:
            raise StateError(f"{type(obj).__name__}.{f.name}: {e}") from None


def _decode_fields(cls: type[T], buf: memoryview, pos: int, version: int) -> tuple[T, int]:
    values: dict[str, Any] = {}
    for f in _spec(cls).fields:
        if f.kind.since > version:
            continue  # absent in this version: the dataclass default applies
        try:
            values[f.name], pos = f.kind.decode(buf, pos, version)
        except StateError as e:
            raise StateError(f"{cls.__name__}.{f.name}: {e}") from None
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except StateError:
            raise
        except (ValueError, TypeError) as e:
            raise StateError(f"{cls.__name__}: {e}") from None
    return obj, pos


def encode(obj: Any) -> bytes:
    """Version header + fields in declaration order, little-endian."""
    spec = _spec(type(obj))
    out = bytearray(_HEADER.pack(spec.version, 0))
    _encode_fields(obj, out)
    return bytes(out)


def decode(cls: type[T], data: bytes | memoryview) -> T:
    """Decode and validate; any problem is a :class:`StateError`, never another exception."""
    spec = _spec(cls)
    buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    if len(buf) < _HEADER.size:
        raise StateError(f"{spec.name}: state record truncated")
    version, _ = _HEADER.unpack_from(buf, 0)
    if not spec.min_version <= version <= spec.version:
        raise StateError(
            f"{spec.name}: state version {version} not supported "
            f"(this bhyvepy reads {spec.min_version}..{spec.version})")
    try:
        obj, pos = _decode_fields(cls, buf, _HEADER.size, version)
    except StateError as e:
        raise StateError(f"{spec.name}: {e}") from None
    except RecursionError:
        raise StateError(f"{spec.name}: state nested too deeply") from None
    if pos != len(buf):
        raise StateError(f"{spec.name}: {len(buf) - pos} trailing bytes after state")
    return obj


def version_of(data: bytes) -> int:
    if len(data) < _HEADER.size:
        raise StateError("state record truncated")
    return _HEADER.unpack_from(data, 0)[0]


# ----------------------------------------------------------------------------
# hypothesis strategies (imported lazily: hypothesis is a test dependency)
# ----------------------------------------------------------------------------

def strategy(cls: type) -> Any:
    """A hypothesis strategy producing valid instances of a state class."""
    from hypothesis import strategies as st

    def for_kind(k: Kind) -> Any:
        if isinstance(k, UInt):
            bits = 8 * k.size
            if k.signed:
                return st.integers(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
            return st.integers(0, (1 << bits) - 1)
        if isinstance(k, Bool):
            return st.booleans()
        if isinstance(k, Blob):
            if k.exact is not None:
                return st.binary(min_size=k.exact, max_size=k.exact)
            return st.binary(max_size=min(k.max_len, 64))
        if isinstance(k, Str):
            return st.text(max_size=min(k.max_len // 4, 32))
        if isinstance(k, Nested):
            return strategy(k.cls)
        if isinstance(k, ListOf):
            n = k.exact
            lo, hi = (n, n) if n is not None else (0, min(k.max_len, 8))
            return st.lists(for_kind(k.item), min_size=lo, max_size=hi)
        raise TypeError(k)

    spec = _spec(cls)
    custom = getattr(cls, "hypothesis_strategy", None)
    if callable(custom):
        return custom()
    return st.builds(cls, **{f.name: for_kind(f.kind) for f in spec.fields})


__all__ = [
    "StateError", "Kind", "UInt", "Bool", "Blob", "Str", "Nested", "ListOf",
    "U8", "U16", "U32", "U64", "I64", "BOOL", "StateSpec", "FieldSpec",
    "device_state", "spec_of", "encode", "decode", "version_of", "strategy",
    "Annotated", "dataclass", "ClassVar", "typing",
]
