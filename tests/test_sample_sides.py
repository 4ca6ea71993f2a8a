"""Samples have sides (issue 24, item 2): ``Sample``, ``DecodedSample`` and ``Batch`` hold ``query``/``target`` side
objects, nothing spells a side into a flat field name (``query_image``, ``target_text``, ...), and no attribute name is
built from a side's name as a string (``getattr(x, f"{side}_image")``). The source scans cover the package, the tests
and the benchmarks, the same way as ``test_import_graph.py`` walks the imports."""
import ast
import re
from dataclasses import fields
from pathlib import Path

from fuselip_med.data.collate import Batch, BatchSide
from fuselip_med.data.dataset import DecodedSample, DecodedSide
from fuselip_med.data.schema import SIDES, Sample, SampleSide

ROOT = Path(__file__).resolve().parents[1]
SCANNED = [ROOT / "fuselip_med", ROOT / "tests", ROOT / "benchmarks"]
FLAT = re.compile(r"(query|target)_(image|text|pixels|image_ids|text_ids|has_image|has_codes)")
STRING_BUILT = re.compile(r"""f["']\{side\}_""")


def sources() -> list[Path]:
    """Every scanned file but this one (its examples are the violations the scan must find)."""
    return sorted(path for folder in SCANNED for path in folder.rglob("*.py") if path != Path(__file__).resolve())


def declared_fields(tree: ast.AST) -> set[str]:
    """Names declared as annotated class attributes (dataclass fields) anywhere in ``tree``."""
    return {item.target.id for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
            for item in node.body if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}


def side_violations(text: str, other_records: set[str]) -> list[str]:
    """Flat side names and string-built attribute names in one source file, as ``line: what`` strings.

    ``other_records``: flat-looking names that other records declare as their own fields (an instruction pair's
    ``target_image``, an explanation case's ``query_image``); reading those is not a sample read.
    """
    found = [f"{n}: string-built side name" for n, line in enumerate(text.splitlines(), 1) if STRING_BUILT.search(line)]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if name in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) > 1 \
                    and isinstance(node.args[1], ast.JoinedStr):
                found.append(f"{node.lineno}: {name} with an f-string name")
            if name == "Sample":
                found += [f"{node.lineno}: Sample({k.arg}=...)" for k in node.keywords
                          if k.arg and FLAT.fullmatch(k.arg)]
        elif isinstance(node, ast.Attribute) and FLAT.fullmatch(node.attr) and node.attr not in other_records:
            found.append(f"{node.lineno}: .{node.attr}")
    return found


def test_the_scan_finds_flat_and_string_built_names():
    bad = ('image = getattr(sample, f"{side}_image")\n'
           'sample = Sample(id="a", source="s", query_image="a.png")\n'
           'caption = sample.target_text\n')
    assert len(side_violations(bad, set())) == 4  # the f-string line twice: as text and as a getattr call
    assert side_violations('caption = sample.target.text\nimage = pair.target_image\n', {"target_image"}) == []
    assert side_violations('message = f"{side} text: bad"\n', set()) == []  # an error message, not a name


def test_sample_holds_a_query_and_a_target_side():
    assert [f.name for f in fields(Sample)] == ["id", "source", "query", "target", "group", "meta"]
    assert [f.name for f in fields(SampleSide)] == ["image", "text"]
    sample = Sample(id="a", source="s", query=SampleSide(image="a.png"), target=SampleSide(text="a caption"))
    assert sample.side("query") is sample.query and sample.side("target") is sample.target
    assert (sample.query.image, sample.query.text, sample.target.image, sample.target.text) == (
        "a.png", None, None, "a caption")
    assert Sample(id="b", source="s").query == SampleSide() == Sample(id="b", source="s").target
    assert SIDES == ("query", "target")


def test_no_record_spells_a_side_into_a_field_name():
    for record in (Sample, SampleSide, DecodedSample, DecodedSide, Batch, BatchSide):
        flat = [f.name for f in fields(record) if FLAT.fullmatch(f.name)]
        assert not flat, f"{record.__name__} has flat side fields {flat}"
        assert not [name for name in dir(record) if FLAT.fullmatch(name)], f"{record.__name__} has a flat alias"


def test_no_flat_side_name_or_string_built_attribute_in_the_sources():
    trees = {path: ast.parse(path.read_text(encoding="utf-8")) for path in sources()}
    other_records = set().union(*(declared_fields(tree) for path, tree in trees.items()
                                  if ROOT / "fuselip_med" in path.parents))
    found = [f"{path.relative_to(ROOT)}:{where}" for path in trees
             for where in side_violations(path.read_text(encoding="utf-8"), other_records)]
    assert not found, "flat side names or string-built attribute names:\n" + "\n".join(found)
