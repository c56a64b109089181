"""Project rules that are cheap to check mechanically."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_SOURCES = [
    p
    for p in REPO.rglob("*.py")
    if not any(part in {"tests", "benchmarks"} or part.startswith(".") for part in p.relative_to(REPO).parts)
]


def test_ci_runs_exactly_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()
    test_command = next(line for line in reversed(ci) if "pytest" in line)
    setup = next(line for line in ci if "setup_comfyui.sh" in line)  # the integration tier's ComfyUI
    readme = (REPO / "README.md").read_text()
    assert f"{setup}\n{test_command}" in readme


def test_pack_never_edits_sys_modules_or_sys_path():
    offenders = []
    for path in PACK_SOURCES:
        text = path.read_text()
        if re.search(r"sys\.modules\s*\[|sys\.modules\.(pop|update|setdefault)|del\s+sys\.modules", text) or re.search(
            r"sys\.path\.(insert|append|extend)|sys\.path\s*=", text
        ):
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders


def test_pack_imports_are_relative():
    """ComfyUI puts its own utils/comfy on sys.path: absolute imports of our modules would get theirs."""
    ours = {p.stem for p in REPO.glob("*.py")} | {p.name for p in REPO.iterdir() if (p / "__init__.py").exists()}
    ours -= {"tests", "benchmarks"}
    offenders = []
    for path in PACK_SOURCES:
        for line in path.read_text().splitlines():
            m = re.match(r"\s*(?:from|import)\s+([A-Za-z_][\w]*)", line)
            if m and m.group(1) in ours:
                offenders.append(f"{path.relative_to(REPO)}: {line.strip()}")
    assert not offenders, offenders
