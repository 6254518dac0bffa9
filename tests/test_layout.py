"""The source tree stands on its own: no module imports in a cycle with the converter's LDM tables, the
release code lives in convert/release/, and no comment sends the reader to a file outside the repository."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [path for folder in ("convert", "export", "riffusion", "scripts") for path in (ROOT / folder).rglob("*.py")]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_ldm_tables_do_not_import_the_library_converter():
    assert "convert.library" not in imported_modules(ROOT / "convert" / "ldm.py")
    assert "convert.ldm" in imported_modules(ROOT / "convert" / "library.py")


def test_the_release_is_one_subpackage_and_the_old_commands_still_run():
    names = {path.name for path in (ROOT / "convert" / "release").iterdir()}
    assert {"assemble.py", "card.py", "manifest.py", "verify.py", "publish.py", "MODEL_CARD.md"} <= names
    for command in ("verify", "publish"):
        assert f"from convert.release.{command} import main" in (ROOT / "convert" / f"{command}.py").read_text()


def test_no_comment_points_outside_the_repository():
    files = SOURCES + [ROOT / "pyproject.toml", ROOT / "README.md"]
    assert [str(path.relative_to(ROOT)) for path in files if "FACTS.md" in path.read_text()] == []
