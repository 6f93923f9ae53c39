import importlib.util
import os
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening, TrainerState, TrainingArguments

from workflow.config import ConfigError, FinetuneConfig, check
from workflow.finetune.batches import PaddingFree, pad_to_longest
from workflow.finetune.callbacks import CheckpointLayers, StopOnNonFiniteLoss
from workflow.finetune.config import COMPLETE, deepspeed_config, latest_complete_checkpoint
from workflow.finetune.launch import launch_command, launch_env
from workflow.finetune.memory import checkpointed_indices, fill_micro_batch, memory_plan
from workflow.finetune.speed import compile_decoder_layers, decoder_layers, register_varlen_attention, resolve, varlen_available


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"zero_stage": 4}, "config: finetune.zero_stage: 4 is not allowed; allowed values: 0, 1, 2, 3"),
        ({"method": "qlora"}, "config: finetune.method: 'qlora' is not allowed; allowed values: 'full', 'lora'"),
        ({"offload_params": True, "zero_stage": 2}, "config: finetune: offload_params needs zero_stage 3 (got zero_stage 2)"),
        ({"offload_optimizer": True, "zero_stage": 0}, "config: finetune: offload_optimizer needs zero_stage 1, 2 or 3"),
        ({"attention": "varlen", "packing": False}, "config: finetune: attention varlen needs packing: true"),
        ({"dataloader_workers": -1}, "config: finetune.dataloader_workers: Input should be greater than or equal to 0 (got -1)"),
        ({"zero_tuning": "fast"}, "config: finetune.zero_tuning: 'fast' is not allowed; allowed values: 'auto', 'stock'"),
        ({"torch_compile": "yes"}, "config: finetune.torch_compile: Input should be a valid boolean (got 'yes')"),
        ({"gradient_checkpointing": "some"}, "config: finetune.gradient_checkpointing: 'some' is not allowed; allowed values: 'auto', True, False"),
        ({"micro_batch_fill": "on"}, "config: finetune.micro_batch_fill: 'on' is not allowed; allowed values: 'auto', 'off'"),
        ({"lora": {"r": 0}}, "config: finetune.lora.r: Input should be greater than or equal to 1 (got 0)"),
        ({"attention": "flash"}, "config: finetune.attention: 'flash' is not allowed; allowed values: 'auto', 'varlen', 'sdpa', 'flex_attention', 'eager'"),
        ({"optimizer": "sgd"}, "config: finetune.optimizer: 'sgd' is not allowed; allowed values: 'adamw_fused', 'adamw_foreach'"),
    ],
)
def test_invalid_settings_are_refused(settings, message):
    with pytest.raises(ConfigError) as refused:
        check({"finetune": settings})
    assert message in str(refused.value).splitlines()[0]


def test_unknown_setting_is_an_error():
    with pytest.raises(ValueError, match="zero_stag"):
        FinetuneConfig(zero_stag=3)


def test_deepspeed_config_follows_settings():
    cfg = deepspeed_config(FinetuneConfig(zero_stage=3, offload_optimizer=True, offload_params=True, precision="bf16"))
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is False
    # bf16 needs no loss scaling: DeepSpeed's per-tensor overflow scan is off unless zero_tuning is stock.
    assert cfg["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert deepspeed_config(FinetuneConfig(precision="bf16", zero_tuning="stock"))["bf16"] == {"enabled": True}
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


def test_the_jobs_cores_are_shared_out_among_its_ranks(monkeypatch):
    """Snakemake gives a job OMP_NUM_THREADS = its threads; two ranks of a 2-thread job take one thread each (two
    each would run 4 threads on 2 cores); without the variable, the cores this process may run on are shared out."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert launch_env(FinetuneConfig(nproc_per_node=2), "", "")["OMP_NUM_THREADS"] == "1"
    assert launch_env(FinetuneConfig(nproc_per_node=8), "", "")["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    assert launch_env(FinetuneConfig(nproc_per_node=2), "", "")["OMP_NUM_THREADS"] == "8"
    monkeypatch.delenv("OMP_NUM_THREADS")
    cores = len(os.sched_getaffinity(0))
    assert launch_env(FinetuneConfig(nproc_per_node=1), "", "")["OMP_NUM_THREADS"] == str(cores)


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


def test_cpu_skips_gpu_only_speed_settings_and_says_why():
    speed = resolve(FinetuneConfig(), cuda=False)
    assert (speed.attention, speed.liger_kernel, speed.torch_compile, speed.dataloader_workers, speed.pin_memory) == ("sdpa", False, False, 0, False)
    assert speed.optimizer == "adamw_torch_fused"
    assert any(s.startswith("liger_kernel: Liger's Triton kernels need a CUDA GPU") for s in speed.skipped)
    assert any(s.startswith("dataloader_workers: 2 -> 0 on CPU") for s in speed.skipped)
    assert resolve(FinetuneConfig(optimizer="adamw_foreach"), cuda=False).optimizer == "adamw_torch"
    with pytest.raises(ValueError, match="finetune.attention varlen runs FlashAttention kernels and needs a CUDA GPU"):
        resolve(FinetuneConfig(attention="varlen"), cuda=False)


def test_gpu_speed_settings():
    speed = resolve(FinetuneConfig(liger_kernel=False), cuda=True)
    assert speed.attention == ("varlen" if varlen_available() else "sdpa")
    assert (speed.torch_compile, speed.dataloader_workers, speed.pin_memory, speed.skipped) == (False, 2, True, ())
    assert resolve(FinetuneConfig(liger_kernel=False, packing=False), cuda=True).attention == "sdpa"
    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(ValueError, match="liger-kernel package is not installed; pip install liger-kernel==0.8.5"):
            resolve(FinetuneConfig(), cuda=True)
    else:
        assert resolve(FinetuneConfig(), cuda=True).liger_kernel


def test_compiled_layers_leave_liger_only_the_loss_and_zero3_runs_eagerly():
    compiled = resolve(FinetuneConfig(torch_compile=True), cuda=False)
    assert compiled.torch_compile and compiled.liger_kernel_config == {"rope": False, "rms_norm": False, "swiglu": False}
    assert resolve(FinetuneConfig(), cuda=False).liger_kernel_config == {}
    zero3 = resolve(FinetuneConfig(torch_compile=True, zero_stage=3), cuda=False)
    assert not zero3.torch_compile
    assert "torch_compile: ZeRO-3's parameter handling recompiles every layer; running eagerly" in zero3.skipped


def test_decoder_layers_are_found_and_compiled_in_place(tiny_base):
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    names = [name for name, _ in model.named_parameters()]
    assert [type(m).__name__ for m in decoder_layers(model)] == ["LlamaDecoderLayer"] * 2
    assert compile_decoder_layers(model) == 2
    assert [name for name, _ in model.named_parameters()] == names  # checkpoints keep their keys
    with pytest.raises(ValueError, match="finetune.torch_compile: found no decoder layers to compile in Linear"):
        compile_decoder_layers(model.lm_head)


def test_a_non_finite_loss_stops_the_run_and_names_the_step():
    args = TrainingArguments(output_dir="unused", logging_steps=10, report_to=[])
    state = TrainerState(global_step=30)
    StopOnNonFiniteLoss().on_log(args, state, None, logs={"loss": 2.5, "grad_norm": 1.0})
    with pytest.raises(FloatingPointError, match=r"the training loss is nan at step 30 \(mean over the last 10 steps\): the run diverged"):
        StopOnNonFiniteLoss().on_log(args, state, None, logs={"loss": float("nan")})


def test_zero_buckets_stock_are_left_to_the_trainer():
    stock = FinetuneConfig(zero_stage=3, zero_tuning="stock")
    zero3 = deepspeed_config(stock, parameters=10**9, world_size=1)["zero_optimization"]
    assert zero3["reduce_bucket_size"] == zero3["stage3_prefetch_bucket_size"] == zero3["stage3_param_persistence_threshold"] == "auto"
    assert "reduce_bucket_size" not in deepspeed_config(FinetuneConfig(zero_stage=1), parameters=10**9)["zero_optimization"]
    # Without the model's size (and for LoRA adapters) auto leaves them to the Trainer too.
    assert deepspeed_config(FinetuneConfig(zero_stage=2))["zero_optimization"]["reduce_bucket_size"] == "auto"
    lora = deepspeed_config(FinetuneConfig(zero_stage=2, method="lora"), parameters=10**9)["zero_optimization"]
    assert lora["reduce_bucket_size"] == "auto"


def test_zero_buckets_auto_follow_model_and_ranks():
    one = deepspeed_config(FinetuneConfig(zero_stage=2), parameters=1_200_000_000, world_size=1)["zero_optimization"]
    assert (one["reduce_bucket_size"], one["overlap_comm"]) == (1_200_000_000, False)
    two = deepspeed_config(FinetuneConfig(zero_stage=2), parameters=1_200_000_000, world_size=2)["zero_optimization"]
    assert (two["reduce_bucket_size"], two["overlap_comm"]) == (500_000_000, True)
    # Reducing each slice to its owner instead of all-reducing whole buckets measured no faster on 2 H200s (README).
    assert "use_multi_rank_bucket_allreduce" not in two
    tiny = deepspeed_config(FinetuneConfig(zero_stage=2), parameters=3_000_000, world_size=2)["zero_optimization"]
    assert tiny["reduce_bucket_size"] == 3_000_000  # allocated up front, twice: not DeepSpeed's 500 M for a small model
    gpu = 80 * 2**30
    alone = deepspeed_config(FinetuneConfig(zero_stage=3), 1_200_000_000, 1, gpu)["zero_optimization"]
    assert alone["stage3_param_persistence_threshold"] == 1_200_000_000
    small = deepspeed_config(FinetuneConfig(zero_stage=3), 1_200_000_000, 4, gpu)["zero_optimization"]
    assert small["stage3_param_persistence_threshold"] == 1_200_000_000
    large = deepspeed_config(FinetuneConfig(zero_stage=3), 8_000_000_000, 4, gpu)["zero_optimization"]
    assert large["stage3_param_persistence_threshold"] == "auto" and large["stage3_prefetch_bucket_size"] == 500_000_000


def test_padding_collator_masks_padding():
    batch = pad_to_longest([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_padding_free_stacks_equal_rows_and_packs_the_rest():
    collate = PaddingFree(DataCollatorWithFlattening(return_flash_attn_kwargs=True))
    same = collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9, 10], "labels": [-100, 9, 10]}])
    assert same["input_ids"].tolist() == [[5, 6, 7], [8, 9, 10]] and "position_ids" not in same
    # The same targets as packing gives: the first token of a row is never predicted.
    assert same["labels"].tolist() == [[-100, 6, 7], [-100, 9, 10]]
    mixed = collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}])
    assert mixed["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert mixed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert mixed["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert mixed["cu_seq_lens_q"].tolist() == [0, 3, 5] and mixed["max_length_q"] == 3


def _gqa_llama(attention: str) -> torch.nn.Module:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=512, vocab_size=1000, max_position_embeddings=512, use_cache=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attention).cuda().eval()


@pytest.mark.skipif(not torch.cuda.is_available() or not varlen_available(), reason="varlen FlashAttention needs a CUDA GPU")
def test_varlen_attention_keeps_packed_sequences_apart():
    """On a GPU: the packed row through varlen attention gives the logits of each sequence run on its own (SDPA)."""
    register_varlen_attention()
    reference, model = _gqa_llama("sdpa"), _gqa_llama("varlen")
    model.load_state_dict(reference.state_dict())
    rows = [{"input_ids": torch.randint(0, 1000, (n,)).tolist()} for n in (37, 128, 5, 300)]
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(rows)
    packed = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in packed.items() if k != "labels"}
    with torch.no_grad():
        apart = torch.cat([reference(input_ids=torch.tensor([r["input_ids"]], device="cuda")).logits[0] for r in rows]).float()
        together = model(**packed).logits[0].float()
    error = (together - apart).norm() / apart.norm()
    assert error < 1e-2, f"relative error {error:.2e}"
    # Rows of one length come stacked (PaddingFree) and take the batched SDPA path.
    stacked = torch.randint(0, 1000, (3, 64), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=stacked).logits, reference(input_ids=stacked).logits)


@pytest.mark.slow  # a real op build (DeepSpeed's CPU Adam, for an offloaded optimizer), once per machine
def test_an_op_build_killed_half_way_does_not_block_later_launches(tmp_path):
    """The launcher builds the ops the ranks would JIT-build (CPU Adam with an offloaded optimizer); a build killed
    half way (SIGKILL, on a cluster scancel) leaves torch's lock file beside the build (torch.utils.file_baton), on
    which every later load waited forever. Here: a copy of the launcher's finished build with that lock planted; the
    launcher's build clears it and loads."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from workflow.finetune import ops

    offload = FinetuneConfig(zero_stage=2, offload_optimizer=True)
    shared = Path(launch_env(offload, "", "")["TORCH_EXTENSIONS_DIR"])
    assert ops.build(offload, shared) == ["cpu_adam"]  # a no-op when a fine-tune built it already
    assert ops.build(FinetuneConfig(), shared) == []  # nothing to build without offload: the CPU all-reduce is skipped
    extensions = tmp_path / "torch_extensions"
    shutil.copytree(shared / "cpu_adam", extensions / "cpu_adam")
    lock = extensions / "cpu_adam" / "lock"
    lock.touch()  # what FileBaton leaves when its holder is killed before release()

    script = ("from pathlib import Path\nfrom workflow.finetune import ops\nfrom workflow.config import FinetuneConfig\n"
              f"print(ops.build(FinetuneConfig(zero_stage=2, offload_optimizer=True), Path({str(extensions)!r})))")
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "['cpu_adam']"
    assert f"removing {lock}, left by an op build that was killed" in done.stderr
    assert not lock.exists() and (extensions / "cpu_adam" / "cpu_adam.so").exists()


@pytest.mark.slow  # torch.compile of the layers, then training twice
def test_compiled_decoder_layers_train_as_the_eager_ones(tiny_base, tracking, tmp_path):
    """torch_compile: true (here on the CPU) runs the real launch and gives the eager run's losses."""
    from workflow.finetune.launch import finetune

    data = tmp_path / "data"
    data.mkdir()
    generator = torch.Generator().manual_seed(0)
    with open(data / "train.jsonl", "w") as handle:
        for _ in range(12):
            ids = torch.randint(5, 200, (32,), generator=generator).tolist()
            handle.write(json.dumps({"input_ids": ids, "labels": [-100] * 8 + ids[8:]}) + "\n")
    losses = {}
    for compiled in (False, True):
        cfg = FinetuneConfig(nproc_per_node=1, max_steps=3, micro_batch_size=4, logging_steps=1, save_steps=100, torch_compile=compiled)
        out = tmp_path / f"compiled-{compiled}"
        out.mkdir()
        summary = finetune(tiny_base, data, out / "summary.json", cfg, 3, tracking, out / "finetune.log")
        assert summary["speed"]["torch_compile"] is compiled
        losses[compiled] = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert "compiled the forward of 2 decoder layers with torch.compile" in (tmp_path / "compiled-True" / "finetune.log").read_text()
    assert len(losses[True]) == 3
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-5)


def test_auto_checkpointing_resolves_from_the_plan_on_gpus_and_to_nothing_on_cpus(tiny_base):
    cfg = FinetuneConfig(precision="bf16", micro_batch_size=1)
    assert cfg.gradient_checkpointing == "auto"
    cpu = memory_plan(cfg, tiny_base, world_size=2, gpu_bytes=None, longest_row=64, liger_kernel=False)
    assert cpu["checkpointed_layers"] == 0 and cpu["predicted_peak_gib"] is None
    roomy = memory_plan(cfg, tiny_base, world_size=2, gpu_bytes=80 * 2**30, longest_row=64, liger_kernel=True)
    assert roomy["checkpointed_layers"] == 0 and roomy["fits"] and 0 < roomy["predicted_peak_gib"] < roomy["limit_gib"] == 72.0
    # a GPU just large enough for the run with both layers recomputed: auto then checkpoints, and fits
    full = memory_plan(FinetuneConfig(precision="bf16", micro_batch_size=1, gradient_checkpointing=True), tiny_base, 2, 80 * 2**30, 8192, True)
    none = memory_plan(FinetuneConfig(precision="bf16", micro_batch_size=1, gradient_checkpointing=False), tiny_base, 2, 80 * 2**30, 8192, True)
    assert full["predicted_peak_gib"] < none["predicted_peak_gib"]
    tight = memory_plan(cfg, tiny_base, 2, int((full["predicted_peak_gib"] + 1e-3) * 2**30 / 0.9), 8192, True)
    assert tight["checkpointed_layers"] in (1, 2) and tight["fits"]
    assert memory_plan(FinetuneConfig(gradient_checkpointing=True), tiny_base, 2, None, 64, False)["checkpointed_layers"] == 2


def test_only_the_chosen_layers_recompute(tiny_base):
    assert checkpointed_indices(9, 32) == [3, 7, 10, 14, 17, 21, 24, 28, 31]
    assert checkpointed_indices(32, 32) == list(range(32)) and checkpointed_indices(0, 32) == []
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    CheckpointLayers(1).on_train_begin(None, None, None, model=model)
    assert [layer.gradient_checkpointing for layer in decoder_layers(model)] == [False, True]
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_micro_batch_fill_keeps_the_rows_per_step_and_fits(tiny_base):
    cfg = FinetuneConfig(precision="bf16", micro_batch_size=1, gradient_accumulation_steps=6)
    filled, plan = fill_micro_batch(cfg, tiny_base, 2, 80 * 2**30, 64, True)
    assert (filled.micro_batch_size, filled.gradient_accumulation_steps) == (6, 1) and plan["fits"]
    assert fill_micro_batch(cfg, tiny_base, 2, None, 64, True)[0] == cfg  # CPU ranks: as configured
    assert fill_micro_batch(cfg.model_copy(update=dict(micro_batch_fill="off")), tiny_base, 2, 80 * 2**30, 64, True)[0].micro_batch_size == 1
    # a GPU that holds 2 rows of 8192 tokens without checkpointing but not 3 or 6: 2 x 3
    two = memory_plan(cfg.model_copy(update=dict(micro_batch_size=2, gradient_checkpointing=False)), tiny_base, 2, 80 * 2**30, 8192, True)
    gpu = int((two["predicted_peak_gib"] + 1e-3) * 2**30 / 0.9)
    filled, plan = fill_micro_batch(cfg.model_copy(update=dict(gradient_checkpointing=False)), tiny_base, 2, gpu, 8192, True)
    assert (filled.micro_batch_size, filled.gradient_accumulation_steps) == (2, 3) and plan["checkpointed_layers"] == 0


def finished_run(tmp_path, cfg, **extra):
    """A job file and one complete checkpoint, as a finished run leaves them."""
    from workflow.finetune.launch import write_job

    model, data = tmp_path / "model", tmp_path / "data"
    model.mkdir(exist_ok=True), data.mkdir(exist_ok=True)
    (model / "config.json").write_text('{"hidden_size": 64}')
    (model / "model.safetensors").write_bytes(b"weights")
    (data / "train.jsonl").write_text('{"input_ids": [1, 2]}\n')
    summary = tmp_path / "finetune" / "summary.json"
    job = write_job(model, data, summary, cfg, seed=0, **extra)
    step = job.parent / "checkpoint-8"
    step.mkdir(exist_ok=True)
    (step / "weights.pt").write_bytes(b"trained for 8 steps")
    (step / COMPLETE).touch()
    return model, data, summary


@pytest.mark.parametrize("change", [{"logging_steps": 1}, {"save_steps": 2, "dataloader_workers": 0}, {"max_steps": 12}],
                         ids=["logging", "save-cadence-and-workers", "longer-run"])
def test_checkpoints_resume_across_settings_that_do_not_change_what_is_trained(tmp_path, change, caplog):
    from workflow.finetune.launch import write_job

    cfg = FinetuneConfig(max_steps=8)
    model, data, summary = finished_run(tmp_path, cfg)
    job = json.loads(write_job(model, data, summary, cfg.model_copy(update=change), seed=0).read_text())
    assert job["resume_from"] == str((summary.parent / "checkpoints" / "checkpoint-8").resolve())
    assert not list(summary.parent.glob("checkpoints.*")) and "WARNING" not in caplog.text


@pytest.mark.parametrize("change", [{"learning_rate": 0.0005}, {"max_steps": 4}], ids=["learning-rate", "shorter-run"])
def test_checkpoints_of_other_settings_are_moved_aside_named_never_deleted(tmp_path, change, caplog):
    from workflow.finetune.launch import write_job

    cfg = FinetuneConfig(max_steps=8)
    model, data, summary = finished_run(tmp_path, cfg)
    old = json.loads((summary.parent / "checkpoints" / "job.json").read_text())["fingerprint"]
    with caplog.at_level("WARNING"):
        job = json.loads(write_job(model, data, summary, cfg.model_copy(update=change), seed=0).read_text())
    assert job["resume_from"] is None
    [aside] = summary.parent.glob("checkpoints.*")
    assert aside.name == f"checkpoints.{old[:12]}"
    assert (aside / "checkpoint-8" / "weights.pt").read_bytes() == b"trained for 8 steps"
    [record] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert f"changed: finetune.{next(iter(change))}" in record.getMessage() and str(aside) in record.getMessage()
    # a seed change moves the new run's folder aside too, next to the first one, which stays as it was
    with caplog.at_level("WARNING"):
        write_job(model, data, summary, cfg.model_copy(update=change), seed=1)
    assert len(list(summary.parent.glob("checkpoints.*"))) == 2 and "changed: seed" in caplog.records[-1].getMessage()
    assert (aside / "checkpoint-8" / "weights.pt").exists()
