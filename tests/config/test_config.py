"""load_config and the config dataclasses: every accepted form, and a table of bad input."""
from __future__ import annotations

import json
import os

import pytest

import pet_hooks
from pet_hooks import LoraConfig, PrefixTuningConfig, PTuning2Config, load_config
from pet_hooks.config.methods import config_types
from tests.conftest import ROOT, SEED_CONFIG

SEED = SEED_CONFIG
SAMPLES = os.path.join(ROOT, "samples", "configs")


def test_seed_example_mapping():
    cfg = load_config(SEED)
    assert isinstance(cfg, LoraConfig)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules) == (8, 16, 0.1, SEED["target_modules"])
    assert cfg.scaling == 2.0
    assert load_config(cfg) is cfg


def test_mindformers_run_yaml(tmp_path):
    cfg = load_config(os.path.join(SAMPLES, "gpt2_lora_mindformers.yaml"))
    assert cfg == load_config(SEED)
    assert cfg.model_hints == {"num_layers": 2, "hidden_size": 64, "num_heads": 4}


def test_top_level_pet_config_yaml_and_json(tmp_path):
    yaml_path = tmp_path / "pet.yaml"
    yaml_path.write_text("pet_config:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in SEED.items()))
    json_path = tmp_path / "pet.json"
    json_path.write_text(json.dumps(SEED))
    assert load_config(str(yaml_path)) == load_config(json_path) == load_config(SEED)


def test_mindformers_extra_keys_accepted():
    cfg = load_config({**SEED, "lora_a_init": "normal", "lora_b_init": "zero", "param_init_type": "float32",
                       "compute_dtype": "float16", "exclude_layers": ["lm_head"], "freeze_include": None,
                       "freeze_exclude": ["*ln_f*"]})
    assert (cfg.lora_a_init, cfg.compute_dtype, cfg.exclude_layers) == ("normal", "float16", ["lm_head"])


def test_prefix_configs_validate():
    assert PTuning2Config(pre_seq_len=8, prefix_projection=True, projection_dim=32).pre_seq_len == 8
    assert PrefixTuningConfig(prefix_token_num=4, mid_dim=16).mid_dim == 16
    assert isinstance(load_config({"pet_type": "ptuning2", "pre_seq_len": 4, "dropout_prob": 0.1}), PTuning2Config)


# Bad values and bad files: the consolidated table in tests/project/test_bad_input.py (each row also
# checks the model is untouched and the traceback never reaches into MindSpore).


def test_missing_file_and_wrong_source_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(TypeError, match="int"):
        load_config(42)


def test_public_names():
    expected = {"PetConfig", "LoraConfig", "PTuning2Config", "PrefixTuningConfig", "load_config", "apply",
                "remove", "merge", "unmerge", "disable_adapters", "delta_parameters", "trainable_summary",
                "save_adapter", "load_adapter"}
    assert expected <= set(pet_hooks.__all__)
    assert all(hasattr(pet_hooks, name) for name in pet_hooks.__all__)


def test_every_config_example_in_docs_methods_loads():
    import re
    import yaml
    with open(os.path.join(ROOT, "docs", "methods.md"), encoding="utf-8") as handle:
        blocks = re.findall(r"```yaml\n(.*?)```", handle.read(), re.S)
    types = [pet_hooks.load_config(yaml.safe_load(block)).pet_type for block in blocks]
    assert set(types) == set(config_types()), types          # one example per registered method
