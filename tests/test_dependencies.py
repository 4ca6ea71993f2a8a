"""Every runtime dependency declared in pyproject.toml is imported by the package or the data tools, or is
named here with the reason it is needed without an import of its own."""
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"Pillow": "PIL", "pyyaml": "yaml", "pylibjpeg-libjpeg": "libjpeg", "pylibjpeg-openjpeg": "openjpeg",
                "opencv-python-headless": "cv2", "faiss-cpu": "faiss", "scikit-learn": "sklearn",
                "dicomweb-client": "dicomweb_client", "dicom-anonymizer": "dicomanonymizer"}
USED_WITHOUT_IMPORT = {
    "pylibjpeg": "pydicom's decoder plugin for JPEG/JPEG-LS/JPEG 2000 DICOM (found by pydicom at decode time)",
    "libjpeg": "pylibjpeg's JPEG and JPEG-LS backend",
    "openjpeg": "pylibjpeg's JPEG 2000 backend",
    "tensorboard": "the event writer behind torch.utils.tensorboard (the tensorboard tracker)",
}


def declared() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0] for spec in project["dependencies"]]


def declared_extras() -> list[str]:
    """The optional extras users install for optional commands (e.g. ``app`` for ``serve``), not ``test``."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    return [re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0] for name, specs in extras.items() if name != "test"
            for spec in specs]


def imported_modules() -> set[str]:
    found = set()
    for path in [*(ROOT / "fuselip_med").rglob("*.py"), *(ROOT / "data_tools").rglob("*.py")]:
        found.update(re.findall(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)", path.read_text(), flags=re.MULTILINE))
    return found


def test_every_declared_dependency_is_used():
    modules = imported_modules() | set(USED_WITHOUT_IMPORT)
    unused = [name for name in declared() if IMPORT_NAMES.get(name, name) not in modules]
    assert not unused, f"declared in pyproject.toml but never imported: {unused}; use them or remove them"


def test_nothing_imports_an_undeclared_third_party_package():
    import sys

    allowed = ({IMPORT_NAMES.get(name, name) for name in [*declared(), *declared_extras()]}
               | {"fuselip_med", "data_tools", "__future__"})
    third_party = {m for m in imported_modules() if m not in sys.stdlib_module_names and m not in allowed}
    assert not third_party, f"imported but not declared in pyproject.toml: {sorted(third_party)}"
