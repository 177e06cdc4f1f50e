"""Every shipped YAML parses and validates: recipe configs through the scripts' own parser (unknown
keys are errors), accelerate configs through accelerate's loader and launcher argument names."""

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import launch_command_parser
from trl import DPOConfig, GRPOConfig, RewardConfig, SFTConfig

from llama4_sparse import modeling_llama4
from llama4_sparse.recipes.common import RecipeArguments, parse_recipe
from llama4_sparse.recipes.grpo import GRPOArguments
from llama4_sparse.recipes.sft import SFTArguments

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
METHODS = {"sft": (SFTConfig, SFTArguments), "dpo": (DPOConfig, RecipeArguments),
           "grpo": (GRPOConfig, GRPOArguments), "reward": (RewardConfig, RecipeArguments)}
RECIPE_CONFIGS = sorted((RECIPES / "configs").glob("*/*.yaml"))
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate_configs").glob("*.yaml"))


def test_every_size_has_configs():
    assert {p.parent.name for p in RECIPE_CONFIGS} == {"tiny", "scout", "maverick"}
    assert {p.stem for p in ACCELERATE_CONFIGS} == {"ddp", "ddp_cpu", "fsdp2", "fsdp2_cpu", "fsdp2_ep", "fsdp2_ep_cpu",
                                                  "zero3_moe", "zero3_moe_cpu"}


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_config_parses_with_its_script(path):
    config_class, arguments_class = METHODS[path.stem.split("_")[0]]
    # GPU configs ask for bf16, which a CPU-only machine refuses unless told it is a CPU run.
    recipe_args, training_args, model_args = parse_recipe(config_class, arguments_class,
                                                          args=["--config", str(path), "--use_cpu", "true"])
    assert recipe_args.model_preset == path.parent.name
    assert training_args.report_to == [] or training_args.report_to == ["none"] or training_args.report_to == "none"
    if model_args.use_peft:
        targets = set(model_args.lora_target_modules or [])
        assert not targets & {"router", "lm_head"}
        assert model_args.lora_dropout == 0, "PEFT's expert (parameter) adapters need lora_dropout 0"
    if path.parent.name == "tiny":
        assert yaml.safe_load(path.read_text())["use_cpu"] is True


def test_unknown_recipe_key_is_an_error(tmp_path):
    bad = tmp_path / "sft.yaml"
    bad.write_text((RECIPES / "configs" / "tiny" / "sft.yaml").read_text() + "max_seq_length: 512\n")
    with pytest.raises(ValueError, match="max_seq_length"):
        parse_recipe(SFTConfig, SFTArguments, args=["--config", str(bad)])


def test_lora_on_experts_with_dropout_is_refused():
    with pytest.raises(ValueError, match="lora_dropout"):
        parse_recipe(DPOConfig, args=["--config", str(RECIPES / "configs" / "tiny" / "dpo.yaml"), "--lora_dropout", "0.05"])


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads_and_names_real_classes(path):
    config = ClusterConfig.from_yaml_file(str(path))  # rejects unknown top-level keys
    launch_options = {a.dest for a in launch_command_parser()._actions}
    raw = yaml.safe_load(path.read_text())
    for section in ("fsdp_config", "deepspeed_config"):
        unknown = set(raw.get(section, {})) - launch_options
        assert not unknown, f"{path.name}: {section} keys accelerate launch does not know: {unknown}"
    fsdp = raw.get("fsdp_config", {})
    if fsdp:
        assert fsdp["fsdp_version"] == 2
        # No explicit class list: accelerate takes the model's _no_split_modules, so text-only models (which have
        # no vision layers to find) shard as well as multimodal ones.
        assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    leaf = raw.get("deepspeed_config", {}).get("deepspeed_moe_layer_cls_names")
    if leaf:
        assert raw["deepspeed_config"]["zero_stage"] == 3
        for name in leaf.split(","):
            assert hasattr(modeling_llama4.moe, name), name
    if path.stem.endswith("_cpu") and path.stem != "ddp_cpu":
        # The GPU config with only the device changed.
        gpu = yaml.safe_load((path.parent / f"{path.stem[:-4]}.yaml").read_text())
        assert raw.get("fsdp_config") == gpu.get("fsdp_config")
        assert raw.get("deepspeed_config") == gpu.get("deepspeed_config")
        assert {k for k in raw if raw[k] != gpu.get(k)} <= {"mixed_precision", "num_processes", "main_process_port"}
    if path.stem == "ddp_cpu":
        # MULTI_GPU is what makes accelerate start two processes on a CPU-only host (gloo).
        assert config.distributed_type.value == "MULTI_GPU" and config.num_processes == 2 and not config.use_cpu
