"""`save_pretrained` that writes this package's class names also for a model FSDP2 has sharded.

`torch.distributed.fsdp.fully_shard` swaps a module's class for a generated subclass defined in torch
(`FSDPLlama4ForCausalLM`). transformers names a saved folder's remote code and `auto_map` after the instance's
class, so a folder saved from a sharded model would point `AutoModelForCausalLM` at torch's FSDP source files
(and copy them in). Saving under this package's own class keeps the folder loadable.
"""

_PACKAGE = __name__.rpartition(".")[0]


class SavesAsOwnClass:
    def save_pretrained(self, *args, **kwargs):
        wrapped = type(self)
        own = next((c for c in wrapped.__mro__ if c.__module__.rpartition(".")[0] == _PACKAGE), wrapped)
        if own is wrapped:
            return super().save_pretrained(*args, **kwargs)
        self.__class__ = own
        try:
            return super().save_pretrained(*args, **kwargs)
        finally:
            self.__class__ = wrapped
