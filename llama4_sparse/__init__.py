"""The one name this project installs: `llama4_sparse`.

The repository keeps its folders at the top (`modeling_llama4/`, `tokenizer/`, `eval/`, `recipes/`), but
`tokenizer`, `recipes` and `eval` are taken on PyPI (or by Python itself), so an install puts them into
site-packages as `llama4_sparse.modeling_llama4`, `llama4_sparse.tokenizer`, `llama4_sparse.eval` and
`llama4_sparse.recipes` (`package-dir` in pyproject.toml). In a checkout this file stands in for that layout:
the subpackages are looked up in the repository root as well, so the same imports work without an install.
"""

from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "pyproject.toml").is_file() and (_ROOT / "modeling_llama4" / "__init__.py").is_file():
    __path__.append(str(_ROOT))
