import pytest
import torch
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

from workflow.finetune.config import COMPLETE, FinetuneConfig, deepspeed_config, latest_complete_checkpoint
from workflow.finetune.launch import launch_command


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"zero_stage": 4}, "finetune.zero_stage must be one of 0, 1, 2, 3 (got 4)"),
        ({"method": "qlora"}, "finetune.method must be one of full, lora"),
        ({"offload_params": True, "zero_stage": 2}, "finetune.offload_params needs zero_stage 3"),
        ({"offload_optimizer": True, "zero_stage": 0}, "finetune.offload_optimizer needs zero_stage 1, 2 or 3"),
    ],
)
def test_invalid_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FinetuneConfig(**settings)


def test_unknown_setting_is_an_error():
    with pytest.raises(TypeError, match="zero_stag"):
        FinetuneConfig(zero_stag=3)


def test_deepspeed_config_follows_settings():
    cfg = deepspeed_config(FinetuneConfig(zero_stage=3, offload_optimizer=True, offload_params=True, precision="bf16"))
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is False
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["optimizer"]["type"] == "AdamW"
    plain = deepspeed_config(FinetuneConfig(zero_stage=2))
    assert "optimizer" not in plain and "offload_optimizer" not in plain["zero_optimization"]
    assert deepspeed_config(FinetuneConfig(zero_stage=3, method="lora"))["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]


def test_launch_commands(tmp_path):
    torchrun = launch_command(FinetuneConfig(nproc_per_node=4), tmp_path / "job.json")
    assert torchrun[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    assert torchrun[-3:] == ["workflow.finetune.train", "--job", str(tmp_path / "job.json")]
    ds = launch_command(FinetuneConfig(launcher="deepspeed", nproc_per_node=8), tmp_path / "job.json")
    assert ds[1:5] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "8"]
    assert "--module" in ds


def test_half_written_checkpoints_are_discarded(tmp_path):
    for step in (4, 8, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-4" / COMPLETE).touch()
    (tmp_path / "checkpoint-8" / COMPLETE).touch()
    assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-8")
    assert not (tmp_path / "checkpoint-12").exists()
    assert latest_complete_checkpoint(tmp_path / "missing") is None


def test_packed_sequences_do_not_see_each_other(tiny_base):
    """Padding-free packing (one row, restarting position ids) gives the same logits as separate rows."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation="sdpa").eval()
    model.config.use_cache = False  # as workflow.finetune.train sets it: with a cache, packing leaks
    rows = [{"input_ids": list(range(5, 17)), "labels": list(range(5, 17))}, {"input_ids": list(range(30, 37)), "labels": list(range(30, 37))}]
    packed = DataCollatorWithFlattening()(rows)
    assert packed["input_ids"].shape == (1, 19)
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        apart = torch.cat([model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in rows])
    torch.testing.assert_close(together, apart, atol=1e-4, rtol=1e-4)
