"""torch.compile: a decode step over transformers' static cache compiles with fullgraph=True (chunked
layers and the MoE included) and generates what eager decoding generates."""

import torch
from transformers import CompileConfig

from text_factory import our_model, tiny_config


def test_compiled_static_cache_decoding_equals_eager():
    model = our_model(tiny_config("scout", "sdpa")).eval()
    assert model._can_compile_fullgraph
    prompt = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(5))
    settings = dict(
        max_new_tokens=14, min_new_tokens=14, do_sample=False, attention_mask=torch.ones_like(prompt),
        cache_implementation="static", return_dict_in_generate=True, output_logits=True,
    )
    eager = model.generate(prompt, **settings, disable_compile=True)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    torch._dynamo.reset()
    compiled = model.generate(prompt, **settings, compile_config=compile_config)
    # 6 + 14 tokens cross two chunk boundaries (chunk 8) while decoding.
    assert compiled.sequences.shape == (1, 20)
    assert torch.equal(compiled.sequences, eager.sequences)
    for step, (ours, reference) in enumerate(zip(compiled.logits, eager.logits)):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4, msg=f"step {step}")
    assert model._compiled_with is compile_config, "generate used the compiled step"
