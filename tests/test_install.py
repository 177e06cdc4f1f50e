"""`pip install .` puts one unique name into site-packages (`llama4_sparse`), so PyPI's `tokenizer` (and any
`recipes` or `eval`) installed next to it keeps working; the entry points run from an install and from a
checkout."""

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env=None):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv holding PyPI's `tokenizer`, then this project; pip, setuptools, torch & co. come from this Python."""
    root = tmp_path_factory.mktemp("install")
    venv.EnvBuilder(with_pip=False).create(root / "venv")
    python = str(root / "venv" / "bin" / "python")
    # This interpreter's packages (also when it is itself a venv) go after the new venv's own; a path added
    # by a .pth file gets no .pth processing, so the editable install of this checkout stays out.
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).strip()
    (Path(site) / "host.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "tokenizer==3.7.0"], cwd=root)
    # No build isolation and no deps: setuptools and the dependencies come from the host Python.
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(REPO)], cwd=root)
    return root, python


def test_install_puts_one_unique_top_level_name(installed):
    root, python = installed
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).strip())
    tops = (next(site.glob("llama4_sparse-*.dist-info")) / "RECORD").read_text().splitlines()
    names = {line.split("/")[0] for line in tops if not line.split("/")[0].endswith((".dist-info", "__pycache__"))}
    assert {n for n in names if not n.startswith("..")} == {"llama4_sparse"}, names   # "../../bin/llama4-eval"
    assert not any((site / name).exists() for name in ("recipes", "eval", "modeling_llama4"))
    # The shipped data files travel with the code.
    assert (site / "llama4_sparse" / "tokenizer" / "default" / "tokenizer.json").is_file()
    assert (site / "llama4_sparse" / "recipes" / "configs" / "tiny" / "sft.yaml").is_file()
    assert (site / "llama4_sparse" / "recipes" / "accelerate_configs" / "fsdp2_cpu.yaml").is_file()


def test_pypi_tokenizer_and_this_project_both_import(installed):
    root, python = installed
    script = (
        "import tokenizer, llama4_sparse.tokenizer as ours, llama4_sparse.modeling_llama4 as m\n"
        "import llama4_sparse.eval, llama4_sparse.recipes.sft\n"
        # PyPI's tokenizer (Miðeind's) tokenizes Icelandic text; ours is the Llama 4 BPE.
        "assert hasattr(tokenizer, 'tokenize') and not hasattr(tokenizer, 'load_tokenizer'), tokenizer.__file__\n"
        "tok = ours.load_tokenizer()\n"
        "assert tok.decode(tok.encode('hello world', add_special_tokens=False)) == 'hello world'\n"
        "assert [t.txt for t in tokenizer.tokenize('Hello world.') if t.txt] == ['Hello', 'world', '.']\n"
        "print(m.__file__)\n"
    )
    where = _run([python, "-c", script], cwd=root)
    assert "venv" in where and str(REPO) not in where, where


def test_entry_points_run_from_an_install(installed):
    root, python = installed
    bindir = Path(python).parent
    assert "--tasks" in _run([str(bindir / "llama4-eval"), "--help"], cwd=root)
    assert "--tasks" in _run([python, "-m", "llama4_sparse.eval", "--help"], cwd=root)
    assert "--rl_method" in _run([python, "-m", "llama4_sparse.recipes.demo", "--help"], cwd=root)


def test_entry_points_run_from_the_checkout():
    env = {**os.environ, "PYTHONPATH": ""}
    assert "--tasks" in _run([sys.executable, "-m", "llama4_sparse.eval", "--help"], cwd=REPO, env=env)
    assert "--rl_method" in _run([sys.executable, "-m", "llama4_sparse.recipes.demo", "--help"], cwd=REPO, env=env)
    assert "--output_dir" in _run([sys.executable, "recipes/sft.py", "--help"], cwd=REPO, env=env)
    # Without any install, the checkout's own `llama4_sparse/__init__.py` finds the folders.
    out = _run([sys.executable, "-S", "-c", "import llama4_sparse; print(llama4_sparse.__path__)"], cwd=REPO)
    assert repr(str(REPO)) in out, out
