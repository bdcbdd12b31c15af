"""`plait prepare` runs without torch, and `import plait` pays for torch only when a name needs it."""

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(SRC)},
                          capture_output=True, text=True, timeout=300)


def test_plait_prepare_never_imports_torch(tmp_path):
    corpus, out = tmp_path / "corpus.txt", tmp_path / "out"
    corpus.write_text("the cat sat on the mat, and the dog ran far.\n" * 300)
    # The whole command, as the console script runs it (entry() exits): the modules are
    # listed at interpreter exit, after everything the command imported.
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')))\n"
            f"sys.argv = ['plait', 'prepare', '--data', {str(corpus)!r}, '--out', {str(out)!r}, "
            "'--vocab-size', '300', '--no-progress']\n"
            "from plait.cli import entry\n"
            "entry()\n")
    proc = python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-00000.bin", "tokenizer.json"]


def test_import_plait_is_torch_free_until_a_name_needs_it():
    code = ("import sys, plait\n"
            "print('torch' in sys.modules, plait.Config.__module__, plait.GPTConfig.__module__)\n"
            "print('torch' in sys.modules)\n"
            "from plait.engine import Engine\n"
            "import plait.model, plait.model.gpt as gpt\n"
            "print(plait.Engine is Engine, plait.build_gpt is gpt.build_gpt, gpt.GPTConfig is plait.GPTConfig,\n"
            "      plait.model.GPTConfig is plait.GPTConfig)\n"
            "print(all(hasattr(plait, name) for name in plait.__all__), set(plait.__all__) <= set(dir(plait)))\n"
            "try:\n"
            "    plait.no_such_name\n"
            "except AttributeError as e:\n"
            "    print(e)\n")
    proc = python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "False plait.config plait.model_shape",
        "False",
        "True True True True",
        "True True",
        "module 'plait' has no attribute 'no_such_name'",
    ]
