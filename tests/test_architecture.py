"""The package's shape (bench/architecture.py): no import runs up the layers, no function over 60 lines, no line over
120 characters; the check itself sees each kind of offence."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("architecture", ROOT / "bench" / "architecture.py")
architecture = importlib.util.module_from_spec(spec)
spec.loader.exec_module(architecture)


def test_the_tree_has_no_upward_import_long_function_or_long_line():
    assert architecture.report() == {what: [] for what in architecture.report()}


def test_every_unit_of_the_package_has_a_layer():
    units = {architecture.unit_of(p, ROOT / "recache") for p in (ROOT / "recache").rglob("*.py")}
    assert units <= set(architecture.RANK)


def test_the_check_finds_an_upward_import_a_long_function_and_a_long_line(tmp_path):
    package = tmp_path / "recache"
    (package / "schedule").mkdir(parents=True)
    (package / "schedule" / "bad.py").write_text("from recache.policies.recache import ReCachePolicy\n"
                                                 "from recache import sampling\n")
    (package / "errors.py").write_text("def f():\n" + "    x = 1\n" * 60 + "    return '" + "y" * 120 + "'\n")
    for folder in ("tests", "bench"):
        (tmp_path / folder).mkdir()
    original = architecture.ROOT
    architecture.ROOT = tmp_path
    try:
        found = architecture.report(tmp_path)
    finally:
        architecture.ROOT = original
    imports, functions, lines = found.values()
    assert imports == ["recache/schedule/bad.py:1: schedule imports policies",
                       "recache/schedule/bad.py:2: schedule imports sampling"]
    assert functions == ["recache/errors.py:1: f is 62 lines"] and len(lines) == 1
