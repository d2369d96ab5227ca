"""bhyve_config(5) tree semantics (bhyvepy.config)."""

from __future__ import annotations

import types

import pytest
from hypothesis import given, settings, strategies as st

from bhyvepy import config as config_module
from bhyvepy.config import (
    ConfigTree,
    ConfigTreeError,
    c_sscanf,
    c_strtol,
    c_strtoul,
    parse_bool,
    program_name,
)
from bhyvepy.errors import BhyveExit


def make_tree() -> tuple[ConfigTree, list[str]]:
    warnings: list[str] = []
    return ConfigTree(warn=warnings.append), warnings


def exit_of(fn, *args, **kwargs) -> BhyveExit:
    with pytest.raises(BhyveExit) as info:
        fn(*args, **kwargs)
    return info.value


# -- setting values -----------------------------------------------------------

def test_dotted_path_creates_nodes_and_dump_lists_leaves_in_insertion_order():
    tree, _ = make_tree()
    tree.set_value("b", "1")
    tree.set_value("a.x.y", "2")
    tree.set_value("a.w", "3")
    tree.set_value("c", "4")
    assert tree.dump() == "b=1\na.x.y=2\na.w=3\nc=4\n"
    assert tree.get_value("a.x.y") == "2"
    assert tree.node("a.x") is not None and tree.node("a.x.y") is None


def test_replacing_a_leaf_moves_it_to_the_end_of_its_node():
    # libnv removes the old pair and appends the new one
    tree, _ = make_tree()
    tree.set_value("memory.size", "256M")
    tree.set_value("memory.wired", "true")
    tree.set_value("x", "1")
    tree.set_value("memory.size", "1G")
    assert tree.dump() == "memory.wired=true\nmemory.size=1G\nx=1\n"


def test_leaf_where_a_node_exists_is_refused_with_bhyves_message():
    tree, _ = make_tree()
    tree.set_value("a.b", "1")
    exc = exit_of(tree.set_value, "a", "2")
    assert exc.status == 4
    assert exc.message == "Attempting to add value 2 to existing node a"


def test_node_below_a_leaf_is_refused_with_warning_then_error():
    tree, warnings = make_tree()
    tree.set_value("a.b", "1")
    exc = exit_of(tree.set_value, "a.b.c.d", "2")
    assert warnings == ["Configuration node a.b.c is a child of existing variable a.b"]
    assert exc.status == 4
    assert exc.message == "Failed to create configuration node a.b.c"


def test_empty_path_component_is_an_invalid_node():
    tree, warnings = make_tree()
    exc = exit_of(tree.set_value, "a..b", "1")
    assert warnings == ["Invalid configuration node: a."]
    assert exc.message == "Failed to create configuration node a."
    assert exc.status == 4


def test_empty_leaf_name_is_stored_like_bhyve_does():
    tree, _ = make_tree()
    tree.set_value("a.", "1")
    tree.set_value("", "2")
    assert tree.dump() == "a.=1\n=2\n"


def test_node_level_set_rejects_dots_and_existing_nodes():
    tree, _ = make_tree()
    node = tree.create_node("pci.0.1.0")
    assert node is not None
    assert exit_of(node.set_value, "a.b", "c").message == "Invalid config node name a.b"
    node.create_node("port")
    exc = exit_of(node.set_value, "port", "x")
    assert exc.message.startswith("Attemping to add value x to existing node port of list ")
    assert exc.status == 4


def test_create_node_returns_none_with_warning_when_a_leaf_blocks_it():
    tree, warnings = make_tree()
    tree.set_value("tpm", "x")
    assert tree.create_node("tpm") is None
    assert warnings == ["Configuration node tpm is a child of existing variable tpm"]


def test_empty_node_views_are_truthy_and_iterable():
    tree, _ = make_tree()
    node = tree.create_node("a")
    assert node and len(node) == 0 and list(node) == []
    node.set_value("k", "v")
    node.create_node("sub").set_value("z", "1")
    names = [name for name, _ in node.items()]
    assert names == ["k", "sub"]
    assert node.is_leaf("k") and node.is_node("sub") and "k" in node


# -- reading values -------------------------------------------------------------

def test_get_value_default_and_fetch_of_node_warns():
    tree, warnings = make_tree()
    tree.set_value("a.b", "1")
    assert tree.get_value("missing") is None
    assert tree.get_value("missing.deep", "d") == "d"
    assert tree.get_value("a") is None
    assert warnings == ["Attempting to fetch value of node a"]


def test_reference_expansion_on_read_only():
    tree, _ = make_tree()
    tree.set_value("disk", "/images/%(name).img")
    tree.set_value("name", "vm1")
    assert tree.get_value("disk") == "/images/vm1.img"
    assert tree.get_raw("disk") == "/images/%(name).img"
    # config.dump shows raw values
    assert "disk=/images/%(name).img\n" in tree.dump()


def test_nested_references_and_escapes():
    tree, _ = make_tree()
    tree.set_value("a", "x\\y")
    tree.set_value("b", "[%(a)]")
    tree.set_value("c", "%(b)\\%(a)")
    # a value without '%' is returned untouched (backslash kept) ...
    assert tree.get_value("a") == "x\\y"
    # ... but a referenced value is always unescaped
    assert tree.get_value("b") == "[xy]"
    assert tree.get_value("c") == "[xy]%(a)"


@pytest.mark.parametrize("raw, expected, warning", [
    ("a%(missing)b", "ab", "Failed to fetch referenced configuration variable missing"),
    ("a%()b", "ab", 'Empty reference in configuration value "a%()b"'),
    ("50%", "50%", 'Invalid reference in configuration value "50%"'),
    ("%(x", "%(x", 'Invalid reference in configuration value "%(x"'),
    ("%x\\", "%x", 'Invalid reference in configuration value "%x\\"'),
])
def test_bad_references_warn_like_bhyve(raw, expected, warning):
    tree, warnings = make_tree()
    tree.set_value("v", raw)
    assert tree.get_value("v") == expected
    assert warnings[0] == warning


def test_self_reference_stops_at_depth_limit():
    tree, warnings = make_tree()
    tree.set_value("loop", "%(loop)")
    assert tree.get_value("loop") == "%(loop)"
    assert warnings == ["Too many recursive references in configuration value"]


@pytest.mark.parametrize("text", ["true", "TRUE", "On", "yes", "1"])
def test_true_words(text):
    assert parse_bool("v", text) is True


@pytest.mark.parametrize("text", ["false", "False", "OFF", "no", "0"])
def test_false_words(text):
    assert parse_bool("v", text) is False


@pytest.mark.parametrize("text", ["", "2", "y", "enable", "01", " true", "truee"])
def test_other_words_are_rejected(text):
    exc = exit_of(parse_bool, "x86.x2apic", text)
    assert exc.status == 4
    assert exc.message == f"Invalid value {text} for boolean variable x86.x2apic"


def test_get_bool_default_and_missing():
    tree, _ = make_tree()
    assert tree.get_bool("a", False) is False
    assert tree.get_bool("a", True) is True
    exc = exit_of(tree.get_bool, "a")
    assert exc.message == "Failed to fetch boolean variable a"
    tree.set_value("flag", "%(other)")
    tree.set_value("other", "yes")
    assert tree.get_bool("flag") is True


def test_get_int_uses_strtol_syntax_and_checks_range():
    tree, _ = make_tree()
    for raw, value in (("42", 42), ("0x10", 16), ("010", 8), (" -3", -3)):
        tree.set_value("n", raw)
        assert tree.get_int("n") == value
    tree.set_value("n", "12abc")
    assert exit_of(tree.get_int, "n").message == "Invalid value for n: '12abc'"
    tree.set_value("n", "300")
    assert exit_of(tree.get_int, "n", maxval=255).status == 4
    assert tree.get_int("absent", 7) == 7


# -- serialisation --------------------------------------------------------------

def test_to_dict_from_dict_round_trip_keeps_order():
    tree, _ = make_tree()
    for path, value in (("z", "1"), ("a.b", "2"), ("a.", "3"), ("m.n.o", "4")):
        tree.set_value(path, value)
    data = tree.to_dict()
    assert data == {"z": "1", "a": {"b": "2", "": "3"}, "m": {"n": {"o": "4"}}}
    clone = ConfigTree.from_dict(data)
    assert clone.dump() == tree.dump()
    data["z"] = "changed"      # a copy, not a view
    assert tree.get_value("z") == "1"


@pytest.mark.parametrize("bad", [
    {"a": 1},
    {"a.b": "x"},
    {"": {"x": "y"}},
    {1: "x"},
    {"a": ["x"]},
    ["not", "a", "mapping"],
])
def test_from_dict_rejects_malformed_trees(bad):
    with pytest.raises(ConfigTreeError):
        ConfigTree.from_dict(bad)


# -- -k files -----------------------------------------------------------------------

def test_kv_file_comments_blank_lines_and_order(tmp_path):
    path = tmp_path / "vm.conf"
    path.write_text("# comment\n\nname=vm1\npci.0.3.0.device=virtio-blk\n"
                    "pci.0.3.0.path=/a=b\nname=vm2")
    tree, _ = make_tree()
    tree.load_file(str(path))
    assert tree.dump() == "pci.0.3.0.device=virtio-blk\npci.0.3.0.path=/a=b\nname=vm2\n"


@pytest.mark.parametrize("line", ["novalue", "empty=", " # indented comment", "\r"])
def test_kv_file_bad_line_reports_file_and_line(tmp_path, line):
    path = tmp_path / "bad.conf"
    path.write_text(f"# first\nok=1\n{line}\n")
    tree, _ = make_tree()
    exc = exit_of(tree.load_kv_file, str(path))
    assert exc.status == 4
    assert exc.message == f"{path} line 3: invalid config option '{line}'"


def test_kv_file_keeps_carriage_returns(tmp_path):
    path = tmp_path / "dos.conf"
    path.write_bytes(b"a=1\r\n")
    tree, _ = make_tree()
    tree.load_file(str(path))
    assert tree.get_value("a") == "1\r"


def test_missing_config_file(tmp_path):
    tree, _ = make_tree()
    missing = tmp_path / "nope"
    exc = exit_of(tree.load_file, str(missing))
    assert exc.status == 4
    assert exc.message == f"Failed to open configuration file {missing}: No such file or directory"


def test_directory_as_config_file_reads_nothing(tmp_path):
    tree, _ = make_tree()
    tree.load_file(str(tmp_path))
    assert tree.dump() == ""


def test_json5_file_by_extension(tmp_path):
    path = tmp_path / "vm.json5"
    path.write_text("""// a VM
    {
      name: 'vm1',
      cpus: 2,
      memory: { size: "1G", wired: true },
      pci: { "0": { "3": { "0": { device: "virtio-blk", path: "/d.img" } } } },
      "x86.x2apic": false,
      empty: {},
    }""")
    tree, _ = make_tree()
    tree.load_file(str(path))
    assert tree.dump() == ("name=vm1\ncpus=2\nmemory.size=1G\nmemory.wired=true\n"
                           "pci.0.3.0.device=virtio-blk\npci.0.3.0.path=/d.img\n"
                           "x86.x2apic=false\n")
    assert tree.node("empty") is not None


def test_json5_by_content_and_flat_fallback(tmp_path):
    sniffed = tmp_path / "conf"
    sniffed.write_text('  {"a": {"b": "c"}}')
    tree, _ = make_tree()
    tree.load_file(str(sniffed))
    assert tree.dump() == "a.b=c\n"
    flat = tmp_path / "flat"
    flat.write_text("{odd=name\n")     # a valid bhyve line that starts with '{'
    tree, _ = make_tree()
    tree.load_file(str(flat))
    assert tree.dump() == "{odd=name\n"


@pytest.mark.parametrize("text, fragment", [
    ("{a: ", "invalid JSON5 configuration"),
    ("[1, 2]", "the top level must be an object"),
    ("{a: [1]}", "invalid value for a"),
    ("{a: {b: null}}", "invalid value for a.b"),
    ("{a: 1.5}", "invalid value for a"),
])
def test_json5_errors(tmp_path, text, fragment):
    path = tmp_path / "bad.json"
    path.write_text(text)
    tree, _ = make_tree()
    exc = exit_of(tree.load_file, str(path))
    assert exc.status == 4
    assert exc.message.startswith(f"{path}: ") and fragment in exc.message


def test_json5_applies_bhyve_conflict_rules(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"a": "leaf", "a.b": "x"}')
    tree, warnings = make_tree()
    exc = exit_of(tree.load_file, str(path))
    assert exc.message == "Failed to create configuration node a"
    assert warnings


# -- C number helpers -----------------------------------------------------------------

def test_c_number_quirks():
    assert c_strtol("  -0x1fz") == (-31, 7, False)
    assert c_strtol("0x") == (0, 1, False)
    assert c_strtol("99999999999999999999")[2] is True
    assert c_strtol("abc") == (0, 0, False)
    assert c_strtoul("-1") == ((1 << 64) - 1, 2, False)
    assert c_sscanf("1:2:3", "%d:%d:%d") == [1, 2, 3]
    assert c_sscanf("1:2", "%d:%d:%d") == [1, 2]
    assert c_sscanf(" 7x", "%d") == [7]
    assert c_sscanf("4294967296", "%d") == [0]          # truncated to int
    assert c_sscanf("99999999999999999999", "%d") == [-1]  # saturated, then truncated
    assert c_sscanf("+", "%d") == []


def test_program_name():
    assert program_name("/usr/sbin/bhyve") == "bhyve"
    assert program_name("/x/bhyvepy/__main__.py") == "bhyvepy"
    assert program_name("") == "bhyvepy"


def test_module_keeps_no_mutable_state():
    mutable = (list, dict, set, bytearray)
    offenders = [name for name, value in vars(config_module).items()
                 if isinstance(value, mutable) and not name.startswith("__")]
    assert offenders == []
    assert not any(isinstance(v, types.SimpleNamespace) for v in vars(config_module).values())


# -- properties -------------------------------------------------------------------------

_component = st.text(alphabet="abcxyz019-_", min_size=1, max_size=4)
_path = st.lists(_component, min_size=1, max_size=4).map(".".join)
_value = st.text(alphabet=st.characters(blacklist_characters="\n\r\x00",
                                        blacklist_categories=("Cs",)),
                 min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_path, _value), max_size=25))
def test_dump_reloads_to_the_same_tree(tmp_path_factory, ops):
    """What config.dump prints, fed back through -k, rebuilds the same tree."""
    tree, _ = make_tree()
    for path, value in ops:
        try:
            tree.set_value(path, value)
        except BhyveExit as exc:
            assert exc.status == 4
    dumped = tree.dump()
    path = tmp_path_factory.mktemp("dump") / "conf"
    path.write_text(dumped, encoding="utf-8")
    reloaded, _ = make_tree()
    reloaded.load_kv_file(str(path))
    assert reloaded.dump() == dumped
    assert ConfigTree.from_dict(tree.to_dict()).dump() == dumped


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_path, _value), max_size=20))
def test_set_value_matches_a_simple_model(ops):
    """Each set either succeeds and is readable, or is refused with status 4."""
    tree, _ = make_tree()
    model: dict[str, str] = {}
    for path, value in ops:
        blocked = any(path == p or path.startswith(p + ".") or p.startswith(path + ".")
                      for p in model if p != path)
        try:
            tree.set_value(path, value)
        except BhyveExit as exc:
            assert blocked and exc.status == 4
            continue
        assert not blocked
        model[path] = value
    assert dict(tree) == model
