"""Makes the package's classes reachable through transformers' Auto classes.

Importing `modeling_llama4` registers every model type here, so `AutoConfig`/`AutoModel*.from_pretrained`
on a folder saved by this package work in any process that imported it (accelerate workers
included). `register_for_auto_class` additionally makes `save_pretrained` copy the source files
into the folder and write `auto_map` into its config.json, so the folder also loads with
`trust_remote_code=True` where this package is not installed (e.g. after a push to the Hub).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .configuration_llama4 import Llama4TextConfig
from .modeling_text import Llama4ForCausalLM, Llama4ForSequenceClassification, Llama4TextModel


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
