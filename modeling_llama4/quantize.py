"""Convert a saved model folder to packed low-bit weights (post-training quantization, or the export step
after QAT, whose saved weights are full precision):

    python -m llama4_sparse.modeling_llama4.quantize --scheme 8da4w --group_size 32 IN_DIR OUT_DIR

The output folder loads with `from_pretrained` (or the Auto classes) like any other and generates on CPU;
the tokenizer files of IN_DIR are copied along.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from .low_bit import convert_to_low_bit, low_bit_bytes
from .quantization_scheme import DEFAULT_SKIP, SCHEME_HELP, QuantizationScheme

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "processor_config.json", "preprocessor_config.json")


def load_model(path: str | Path):
    """The package's model class named in the folder's config.json, loaded in float32."""
    from . import Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4ForSequenceClassification

    classes = {c.__name__: c for c in (Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4ForSequenceClassification)}
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json: pass a folder written by save_pretrained")
    names = json.loads(config_file.read_text()).get("architectures") or []
    model_class = next((classes[n] for n in names if n in classes), None)
    if model_class is None:
        raise ValueError(f"{path} holds {names or 'no architectures'}; this tool converts {sorted(classes)}")
    return model_class.from_pretrained(path, dtype=torch.float32)


def quantize_folder(source: str | Path, target: str | Path, scheme: QuantizationScheme) -> dict:
    model = load_model(source)
    convert_to_low_bit(model, scheme)
    model.save_pretrained(target)
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(target) / name)
    stored = low_bit_bytes(model)
    return {"scheme": scheme.to_dict(), "bytes": stored,
            "folder_bytes": sum(f.stat().st_size for f in Path(target).iterdir() if f.suffix == ".safetensors")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="folder written by save_pretrained")
    parser.add_argument("target", help="output folder")
    parser.add_argument("--scheme", default="8da4w", help=SCHEME_HELP)
    parser.add_argument("--group_size", type=int, default=32, help="weights per scale, along each reduction dimension")
    parser.add_argument("--skip", nargs="*", default=list(DEFAULT_SKIP),
                        help="module-name substrings kept in full precision")
    args = parser.parse_args(argv)
    result = quantize_folder(args.source, args.target, QuantizationScheme(args.scheme, args.group_size, tuple(args.skip)))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
