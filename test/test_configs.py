"""Every DeepSpeed config must be accepted by DeepSpeed's own parser once the Trainer fills its "auto" values."""

import json
from pathlib import Path

import pytest
from deepspeed.runtime.config import DeepSpeedConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
CONFIGS = sorted(CONFIG_DIR.glob("*_config.json"))
# What the HF Trainer puts in place of "auto" (values of the right type; the Trainer computes the real ones).
AUTO_VALUES = {
    "lr": 1e-5,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "weight_decay": 0.0,
    "warmup_min_lr": 0,
    "warmup_max_lr": 1e-5,
    "warmup_num_steps": 0,
    "reduce_bucket_size": 1_000_000,
    "stage3_prefetch_bucket_size": 900_000,
    "stage3_param_persistence_threshold": 10_000,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "train_micro_batch_size_per_gpu": 4,
    "enabled": True,
}


def fill_auto(node, key=None):
    if isinstance(node, dict):
        return {k: fill_auto(v, k) for k, v in node.items()}
    if node == "auto":
        return AUTO_VALUES[key]
    return node


def test_the_expected_configs_exist():
    assert {p.name for p in CONFIGS} >= {"a100_config.json", "a10_config.json", "v100_config.json", "cpu_config.json"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_with_deepspeed(path):
    raw = json.loads(path.read_text())
    parsed = DeepSpeedConfig(fill_auto(raw))
    assert parsed.zero_optimization_stage == 3
    assert parsed.zero_config.gather_16bit_weights_on_model_save
    # Left out so DeepSpeed derives it from the real world size (see README, "DeepSpeed configs").
    assert "train_batch_size" not in raw


def test_precision_per_family():
    a100, a10, v100, cpu = (
        json.loads((CONFIG_DIR / f"{n}_config.json").read_text()) for n in ("a100", "a10", "v100", "cpu")
    )
    assert a100["bf16"]["enabled"] == "auto" and "fp16" not in a100
    assert v100["fp16"]["enabled"] is True and "bf16" not in v100
    assert not cpu["fp16"]["enabled"] and not cpu["bf16"]["enabled"]
    for offloaded in (a10, v100):
        assert offloaded["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_optimizer" not in a100["zero_optimization"]


def test_lora_runs_use_the_same_config_at_zero_stage_2():
    from training.rank.deepspeed_config import deepspeed_config_for

    a10 = str(CONFIG_DIR / "a10_config.json")
    assert deepspeed_config_for(a10, lora=False) == a10
    assert deepspeed_config_for(None, lora=True) is None
    lora = deepspeed_config_for(a10, lora=True)
    assert lora["zero_optimization"]["stage"] == 2
    assert lora["zero_optimization"]["offload_optimizer"]["device"] == "cpu"  # everything else kept
    assert DeepSpeedConfig(fill_auto(lora)).zero_optimization_stage == 2
