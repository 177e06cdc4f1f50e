"""Makes the package's classes reachable through transformers' Auto classes.

Importing `modeling_llama4` registers every model type here, so `AutoConfig`/`AutoModel*.from_pretrained`
on a folder saved by this package work in any process that imported it (accelerate workers
included). `register_for_auto_class` additionally makes `save_pretrained` copy the source files
into the folder and write `auto_map` into its config.json, so the folder also loads with
`trust_remote_code=True` where this package is not installed (e.g. after a push to the Hub).
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSequenceClassification,
    AutoProcessor,
    AutoTokenizer,
)
from llama4_sparse.tokenizer import Llama4Tokenizer

from .configuration_llama4 import Llama4Config, Llama4TextConfig, Llama4VisionConfig
from .image_processing import Llama4ImageProcessor
from .modeling_multimodal import Llama4ForConditionalGeneration
from .modeling_text import Llama4ForCausalLM, Llama4ForSequenceClassification, Llama4TextModel
from .modeling_vision import Llama4VisionModel
from .processing import Llama4Processor


def _register(config_class, models: dict) -> None:
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    config_class.register_for_auto_class("AutoConfig")
    for auto_class, model_class in models.items():
        auto_class.register(config_class, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)


_register(
    Llama4TextConfig,
    {
        AutoModel: Llama4TextModel,
        AutoModelForCausalLM: Llama4ForCausalLM,
        AutoModelForSequenceClassification: Llama4ForSequenceClassification,
    },
)
_register(Llama4VisionConfig, {AutoModel: Llama4VisionModel})
# AutoModelForCausalLM serves the multimodal model too (as transformers does for Gemma 3 and Mistral 3), so
# text-only tools that load causal LMs (lm-eval's `hf` model, TRL scripts) work on multimodal folders. The last
# auto class registered is the one transformers writes into a saved folder's auto_map; the model's
# save_pretrained adds the others.
_register(
    Llama4Config,
    {
        AutoModel: Llama4ForConditionalGeneration,
        AutoModelForCausalLM: Llama4ForConditionalGeneration,
        AutoModelForImageTextToText: Llama4ForConditionalGeneration,
    },
)
AutoImageProcessor.register(Llama4Config, image_processor_classes={"pil": Llama4ImageProcessor, "torchvision": Llama4ImageProcessor}, exist_ok=True)
Llama4ImageProcessor.register_for_auto_class("AutoImageProcessor")
AutoProcessor.register(Llama4Config, Llama4Processor, exist_ok=True)
Llama4Processor.register_for_auto_class("AutoProcessor")
# The tokenizer lives in the sibling `tokenizer` package (light: no model code), keyed on our configs so a
# saved model folder's AutoTokenizer resolves to it even where only modeling_llama4 was imported.
AutoTokenizer.register(Llama4TextConfig, tokenizer_class=Llama4Tokenizer, exist_ok=True)
AutoTokenizer.register(Llama4Config, tokenizer_class=Llama4Tokenizer, exist_ok=True)


# --- Opt-in: official checkpoints through the Auto API -------------------------------------------------------------
# Official folders (the Hub's meta-llama/Llama-4-*, and what transformers' own Llama 4 classes save) carry the model
# types below, which transformers maps to its own (dense) classes. Mapping them to this package's configs instead
# makes AutoConfig read them as ours; our configs are registered with the AutoModel* classes above, so those then
# build this package's models from the unchanged official weights.
OFFICIAL_MODEL_TYPES = {"llama4": Llama4Config, "llama4_text": Llama4TextConfig, "llama4_vision_model": Llama4VisionConfig}
_displaced: dict = {}


def register_official_model_types() -> None:
    """Serve official `model_type: "llama4"` (and `"llama4_text"`, `"llama4_vision_model"`) folders with this
    package's classes through AutoConfig/AutoModel/AutoModelForCausalLM/AutoModelForImageTextToText, in this
    process, until `unregister_official_model_types()`. Idempotent. Processors are not redirected: load an official
    processor with `Llama4Processor.from_pretrained`."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for model_type, config_class in OFFICIAL_MODEL_TYPES.items():
        if model_type not in _displaced:
            # What was registered before (normally nothing: transformers' built-in class applies).
            _displaced[model_type] = CONFIG_MAPPING._extra_content.get(model_type)
        CONFIG_MAPPING.register(model_type, config_class, exist_ok=True)


def unregister_official_model_types() -> None:
    """Undo `register_official_model_types()`: official folders resolve to transformers' classes again."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for model_type, previous in list(_displaced.items()):
        if previous is None:
            CONFIG_MAPPING._extra_content.pop(model_type, None)
        else:
            CONFIG_MAPPING._extra_content[model_type] = previous
        del _displaced[model_type]


def official_model_types_registered() -> bool:
    return bool(_displaced)


class official_model_types:
    """`with modeling_llama4.official_model_types(): ...` registers the official model types for the block only."""

    def __enter__(self):
        self._was_registered = official_model_types_registered()
        register_official_model_types()
        return self

    def __exit__(self, *exc_info):
        if not self._was_registered:
            unregister_official_model_types()
        return False
