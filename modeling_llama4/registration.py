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
from tokenizer import Llama4Tokenizer

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
