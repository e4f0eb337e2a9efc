"""The README's "How it is built" tree names every module and package of moekern/, and nothing that is gone."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_tree() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## How it is built"):]
    start = section.index("```\nmoekern/") + 4
    return section[start: section.index("\n```", start)]


def test_the_tree_names_every_module_and_package():
    tree = readme_tree()
    package = ROOT / "moekern"
    named = [p.name for p in package.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    named += [f"{p.name}/" for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    missing = [name for name in named if not re.search(rf"(^|[\s/(]){re.escape(name)}", tree, re.M)]
    assert not missing, f"README's tree does not name {missing}"


def test_every_path_in_the_tree_exists():
    tree = readme_tree()
    paths = re.findall(r"^  ([\w/]+(?:\.py|/))", tree, re.M)
    assert len(paths) > 20
    gone = [p for p in paths if not (ROOT / "moekern" / p).exists()]
    assert not gone, f"README's tree names {gone}, which moekern/ does not have"
