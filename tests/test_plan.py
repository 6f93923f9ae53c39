"""The plan's figures against hand computations for published architectures and against DeepSpeed's own
estimators, its refusals, and the plan rule stopping a config that cannot fit before anything else runs."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, merge
from workflow.capacity import GIB, Architecture, Cluster, PlanError, Serving, Training, model_states, serving_memory, training_memory
from workflow.config import Config, TrtllmSettings, settings
from workflow.plan import checked_plan, plan, plan_for

# config.json values of the published checkpoints (Hugging Face), written here so no hub is needed.
QWEN_7B = {  # DeepSeek-R1-Distill-Qwen-7B (Qwen2.5-Math-7B architecture)
    "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "intermediate_size": 18944, "tie_word_embeddings": False,
}
LLAMA_70B = {  # DeepSeek-R1-Distill-Llama-70B (Llama-3.3-70B architecture)
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
    "num_key_value_heads": 8, "intermediate_size": 28672, "tie_word_embeddings": False,
}
LLAMA_8B = {  # Llama-3.1-8B and DeepSeek-R1-Distill-Llama-8B
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 14336, "tie_word_embeddings": False,
}
DEEPSEEK_67B = {  # deepseek-llm-67b-base: the "67B" the source document sized at 536 GB in FP16
    "model_type": "llama", "vocab_size": 102400, "hidden_size": 8192, "num_hidden_layers": 95, "num_attention_heads": 64,
    "num_key_value_heads": 8, "intermediate_size": 22016,
}


def test_parameter_counts_match_the_published_models():
    # Qwen2 7B: embed + lm_head 2 x 152064 x 3584; per layer q 3584^2 + bias, k and v 3584 x 512 + bias,
    # o 3584^2, MLP 3 x 3584 x 18944, two norms; final norm.
    qwen_layer = 3584 * 3584 + 3584 + 2 * (3584 * 512 + 512) + 3584 * 3584 + 3 * 3584 * 18944 + 2 * 3584
    assert Architecture.from_hf_config(QWEN_7B).params()["total"] == 28 * qwen_layer + 2 * 152064 * 3584 + 3584 == 7_615_616_512
    llama_layer = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192
    assert Architecture.from_hf_config(LLAMA_70B).params()["total"] == 80 * llama_layer + 2 * 128256 * 8192 + 8192 == 70_553_706_496


def test_the_source_documents_67b_is_134_gb_of_fp16_weights_not_536():
    params = Architecture.from_hf_config(DEEPSEEK_67B).params()["total"]
    assert 66.5e9 < params < 68e9
    assert round(2 * params / 1e9) == 135  # 2 bytes per parameter: ~134-135 GB, a quarter of the document's 536 GB


@pytest.mark.parametrize("config", [QWEN_7B, LLAMA_70B], ids=["qwen7b", "llama70b"])
@pytest.mark.parametrize("gpus,nodes", [(8, 1), (8, 2), (4, 1)])
def test_model_states_equal_deepspeeds_estimators(config, gpus, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    p = Architecture.from_hf_config(config).params()
    total, largest = p["total"], p["largest_layer"]

    def ours(stage, opt, par):
        states = model_states(total, total, largest, Training(zero_stage=stage, offload_optimizer=opt, offload_params=par, ranks_per_node=gpus, nodes=nodes))
        states.pop("host_offload")
        return sum(states.values())

    assert ours(2, False, False) == estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=False)[1]
    assert ours(2, True, False) == estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=True)[1]
    for opt, par in [(False, False), (True, False), (True, True)]:
        deepspeed = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=opt, cpu_offload_params=par)[1]
        assert ours(3, opt, par) == deepspeed, (opt, par)


def test_training_figures_by_hand_qwen_7b_zero2_on_8_gpus():
    arch = Architecture.from_hf_config(QWEN_7B)
    P = 7_615_616_512
    t = Training(precision="bf16", zero_stage=2, micro_batch_size=1, seq_len=4096, ranks_per_node=8)
    got = training_memory(arch, t, Cluster(gpus_per_node=8, gpu_memory_gib=80, overhead_gib=0))
    expected = {
        "weights": 2 * P,                    # bf16 weights, replicated below ZeRO-3
        "gradients": 2 * P / 8,              # bf16 gradients, partitioned by ZeRO-2
        "fp32_gradients": 4 * P / 8,         # DeepSpeed's fp32 gradient partition, made for the optimizer step
        "optimizer": 12 * P / 8,             # fp32 master + Adam m, v, partitioned
        "gathered_layer": 0,
        "gradient_copy": 2 * P / 8,          # the flat bf16 copy DeepSpeed converts to fp32 for the step
        "buffers": 2 * 2 * 500_000_000,      # two 500 M-element bf16 reduce buckets (zero_tuning auto, several ranks)
        # per token and layer, the model's own layers: 8h + 3q + 2kv + 4i elements of 2 bytes, 28 layers, 4096 tokens
        "activations": 4096 * 2 * (8 * 3584 + 3 * 3584 + 2 * 512 + 4 * 18944) * 28,
        "logits": 4096 * 152064 * 12,        # bf16 logits, their fp32 copy and log-softmax, the fp32 gradient
        "overhead": 0,
    }
    assert got["per_process_gib"] == {k: round(v / GIB, 4) for k, v in expected.items()}
    resident = sum(expected[k] for k in ("weights", "gradients", "optimizer", "buffers"))
    backward = resident + expected["activations"] + expected["logits"]
    step = resident + expected["fp32_gradients"] + expected["gradient_copy"]
    assert got["phases_gib"] == {"forward_backward": round(backward / GIB, 4), "optimizer_step": round(step / GIB, 4)}
    assert got["device_gib"] == round(max(backward, step) / GIB, 4)

    full = Training(precision="bf16", zero_stage=2, seq_len=4096, ranks_per_node=8, gradient_checkpointing=True)
    checkpointed = training_memory(arch, full, Cluster(gpus_per_node=8))["per_process_gib"]["activations"]
    one_layer = 4096 * 2 * (8 * 3584 + 3 * 3584 + 2 * 512 + 4 * 18944)
    assert checkpointed == round((28 * 4096 * 2 * 3584 + one_layer) / GIB, 4)  # layer inputs + one layer recomputed
    liger = training_memory(arch, replace(t, liger_kernel=True), Cluster(gpus_per_node=8))["per_process_gib"]
    assert liger["activations"] == round(4096 * 2 * (4 * 3584 + 3 * 3584 + 2 * 512 + 3 * 18944) * 28 / GIB, 4)
    assert liger["logits"] == round((4096 * 2 * 3584 + 2 * 152064 * 3584) / GIB, 4)  # input and lm_head gradients, no logits


LLAMA_1B = {  # Llama-3.2-1B: tied embeddings
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 8192, "tie_word_embeddings": True,
}
# Peaks measured on H200s (torch.cuda.max_memory_allocated on rank 0, GiB), bf16, by benchmarks/finetune_throughput.py
# (issue 17, 2026-11-30; README, Fine-tuning speed on GPUs): (model, ranks, ZeRO stage, micro-batch rows, tokens per
# row, gradient accumulation, checkpointed layers, Liger and zero_tuning auto (the defaults) or neither (the stock
# baseline), measured peak). The first six 8B rows are from issue 17's own notes.
MEASURED = [
    (LLAMA_8B, 2, 2, 2, 2048, 1, 0, True, 89.8), (LLAMA_8B, 2, 3, 2, 2048, 1, 0, True, 82.9),
    (LLAMA_8B, 2, 2, 1, 16384, 1, 32, True, 89.8), (LLAMA_8B, 2, 3, 1, 16384, 1, 32, True, 71.5),
    (LLAMA_8B, 2, 2, 1, 32768, 1, 32, True, 89.8), (LLAMA_8B, 2, 3, 1, 32768, 1, 32, True, 78.1),
    # nvidia-h200-x2, call 1
    (LLAMA_8B, 2, 2, 1, 4096, 4, 0, False, 97.9), (LLAMA_8B, 2, 2, 1, 4096, 4, 0, True, 89.8),
    (LLAMA_8B, 2, 2, 1, 16384, 1, 9, True, 114.5), (LLAMA_8B, 2, 2, 1, 32768, 1, 22, True, 115.1),
    # call 2
    (LLAMA_8B, 2, 2, 2, 4096, 2, 0, True, 104.4), (LLAMA_8B, 2, 3, 4, 4096, 1, 0, True, 134.4),
    (LLAMA_8B, 2, 2, 1, 16384, 1, 3, True, 126.5), (LLAMA_8B, 2, 2, 1, 32768, 1, 20, True, 123.1),
    # call 3 (the current defaults)
    (LLAMA_8B, 2, 3, 2, 4096, 2, 0, True, 100.1), (LLAMA_8B, 2, 2, 1, 16384, 1, 6, True, 120.5),
    (LLAMA_8B, 2, 2, 1, 32768, 1, 21, True, 119.1),
    (QWEN_7B, 2, 2, 1, 4096, 4, 0, False, 95.0), (QWEN_7B, 2, 2, 2, 4096, 2, 0, True, 100.8),
    (QWEN_7B, 2, 3, 2, 4096, 2, 0, True, 97.1),
    # nvidia-h200, one rank
    (LLAMA_1B, 1, 2, 8, 2048, 1, 0, False, 66.4), (LLAMA_1B, 1, 2, 8, 2048, 1, 0, True, 37.8),
]


@pytest.mark.parametrize("config,ranks,stage,rows,seq,accumulation,layers,liger,measured", MEASURED)
def test_predicted_peaks_agree_with_measured_ones_within_15_percent(config, ranks, stage, rows, seq, accumulation, layers, liger, measured):
    arch = Architecture.from_hf_config(config)
    t = Training(precision="bf16", zero_stage=stage, micro_batch_size=rows, seq_len=seq, ranks_per_node=ranks, gradient_accumulation_steps=accumulation,
                 checkpointed_layers=layers, liger_kernel=liger, zero_tuning="auto" if liger else "stock")
    predicted = training_memory(arch, t, Cluster(gpus_per_node=ranks, gpu_memory_gib=139, overhead_gib=0))["device_gib"]
    assert -0.05 < (predicted - measured) / measured < 0.15, (predicted, measured)


def test_auto_checkpointing_picks_the_fewest_layers_that_fit():
    arch = Architecture.from_hf_config(LLAMA_8B)
    cluster = Cluster(gpus_per_node=2, gpu_memory_gib=125, overhead_gib=0)
    t = Training(precision="bf16", zero_stage=2, seq_len=16384, ranks_per_node=2, gradient_checkpointing="auto", liger_kernel=True,
                 gradient_accumulation_steps=1)
    got = training_memory(arch, t, cluster)
    k = got["setup"]["checkpointed_layers"]
    assert 0 < k < 32 and got["fits"]
    assert not training_memory(arch, replace(t, checkpointed_layers=k - 1), cluster)["fits"]
    assert training_memory(arch, replace(t, seq_len=2048), cluster)["setup"]["checkpointed_layers"] == 0
    longer = training_memory(arch, replace(t, seq_len=32768), cluster)["setup"]["checkpointed_layers"]
    assert k < longer < 32
    # CPU ranks never checkpoint under auto (the plan then checks host memory as before)
    assert training_memory(arch, t, Cluster(gpus_per_node=0, host_memory_gib=4096))["setup"]["checkpointed_layers"] == 0


def test_offload_moves_states_to_host_memory_per_node():
    arch = Architecture.from_hf_config(QWEN_7B)
    P = arch.params()["total"]
    m = training_memory(arch, Training(zero_stage=3, offload_optimizer=True, offload_params=True, ranks_per_node=8, seq_len=512),
                        Cluster(gpus_per_node=8, host_memory_gib=512))
    # all 18 bytes/param of the partitions (weights 2, fp32 gradients 4, master + moments 12) on the node's host
    assert m["host_per_node_gib"] == round(18 * P / GIB, 4)


def test_serving_figures_by_hand_llama_70b_tp4_pp2():
    arch = Architecture.from_hf_config(LLAMA_70B)
    p = arch.params()
    cluster = Cluster(gpus_per_node=8, gpu_memory_gib=80, overhead_gib=0)
    kv = 64 * 2048 * (80 // 2) * 2 * (8 // 4) * 128 * 2  # batch x seq x layers/pp x (K, V) x kv heads/tp x head_dim x bf16
    assert kv == 5 * GIB
    norms = 80 * 2 * 8192 + 8192
    for scheme, per_weight in [("bf16", 2), ("fp8", 1), ("int8_sq", 1), ("int4_awq", 0.5 + 2 / 128)]:
        m = serving_memory(arch, Serving(scheme, tp=4, pp=2, max_batch=64, max_seq_len=2048), cluster)
        weights = p["linear"] * per_weight / 8 + 2 * norms / 8 + 2 * 128256 * 8192 / 4  # embedding (stage 0) or lm_head (last), split by tp
        assert m["per_device_gib"] == {"weights": round(weights / GIB, 4), "kv_cache": round(kv / GIB, 4), "overhead": 0.0}
        assert m["fits"]
    bf16 = serving_memory(arch, Serving("bf16", tp=1, pp=1, max_batch=64, max_seq_len=2048), cluster)
    assert bf16["weights_total_gib"] == round(2 * p["total"] / GIB, 4) and not bf16["fits"]


def default_settings(max_seq_len: int | None = None, **changes) -> Config:
    """The embedded default config with sections changed (merged key by key), typed as the plan rule gets it."""
    cfg = merge(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), changes)
    if max_seq_len is not None:
        cfg["data"]["max_seq_len"] = max_seq_len
    return settings(cfg)


def cluster_70b(**finetune) -> Config:
    return default_settings(
        finetune={"precision": "bf16", "nproc_per_node": 8, "micro_batch_size": 1, "zero_stage": 2} | finetune,
        data={"max_seq_len": 4096},
        cluster={"gpus_per_node": 8, "gpu_memory_gib": 80, "nodes": 2, "host_memory_gib": 1024, "overhead_gib": 2},
        engine={"backend": "tensorrt_llm", "tensorrt_llm": {"tp_size": 4, "pp_size": 2, "max_batch_size": 64, "max_input_len": 1024, "max_seq_len": 2048}},
    )


def test_70b_with_zero2_fails_with_numbers_and_the_smallest_change_that_fits(tmp_path, tracking):
    model = tmp_path / "llama70b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_70B))
    with pytest.raises(PlanError) as err:
        plan(str(model), cluster_70b(gradient_checkpointing=False), tmp_path / "plan.json", tmp_path / "plan.md", tracking)
    message = str(err.value)
    assert ("training does not fit: 284 GiB per GPU > cluster.gpu_memory_gib 80 (ZeRO-2, 16 ranks, micro-batch 1 x 4096 tokens, "
            "0 of 80 layers checkpointed") in message
    assert 'smallest change that fits: finetune.zero_stage: 3, finetune.gradient_checkpointing: "auto", finetune.offload_optimizer: true' in message
    result = json.loads((tmp_path / "plan.json").read_text())
    changes = result["training"]["suggestion"]["changes"]
    assert not result["fits"] and result["training"]["suggestion"]["memory"]["fits"]
    # the suggestion, applied, fits
    applied = plan_for(Architecture.from_hf_config(LLAMA_70B), cluster_70b(**({"gradient_checkpointing": False} | {k.split(".")[1]: v for k, v in changes.items()})))
    assert applied["training"]["fits"], applied["problems"]
    assert "# Plan: DOES NOT FIT" in (tmp_path / "plan.md").read_text()
    runs = MlflowClient(tracking.resolved_uri()).search_runs(
        [MlflowClient(tracking.resolved_uri()).get_experiment_by_name("tests").experiment_id], filter_string="attributes.run_name = 'plan'")
    assert runs[0].info.status == "FAILED" and runs[0].data.tags["ft2prod.plan"] == "does not fit"
    assert runs[0].data.metrics["training_gib_per_gpu"] == pytest.approx(283.54, abs=0.01)


def test_serving_that_cannot_fit_suggests_more_gpus():
    config = cluster_70b(zero_stage=3, gradient_checkpointing=True, offload_optimizer=True)
    config = config.model_copy(update={"engine": config.engine.model_copy(update={"tensorrt_llm": TrtllmSettings(max_input_len=1024)})})
    result = plan_for(Architecture.from_hf_config(LLAMA_70B), config)
    assert not result["serving"]["bf16"]["fits"] and result["serving"]["int4_awq"]["fits"]
    # tp 2 would hold 65.7 GiB of weights + 20 GiB of KV cache (64 x 2048 x 80 layers x 2 x 4 heads x 128 x 2 B) + 2: too much
    assert result["serving"]["bf16"]["suggestion"]["changes"] == {"engine.tensorrt_llm.tp_size": 4, "engine.tensorrt_llm.pp_size": 1}
    assert any(p.startswith("serving bf16 does not fit: 173 GiB per device > 80 GiB at tp 1 x pp 1, batch 64 x 2048 tokens (weights 131 GiB, KV cache 40 GiB)") for p in result["problems"])


def test_bad_model_configs_are_refused_with_the_reason(tmp_path):
    with pytest.raises(PlanError, match=r"plan: x.json lacks hidden_size; expected a Hugging Face causal-LM config.json"):
        Architecture.from_hf_config({k: v for k, v in QWEN_7B.items() if k != "hidden_size"}, "x.json")
    with pytest.raises(PlanError, match="mixture-of-experts"):
        Architecture.from_hf_config(QWEN_7B | {"n_routed_experts": 256}, "r1.json")
    with pytest.raises(PlanError, match="config.json not found"):
        plan(str(tmp_path), default_settings(), tmp_path / "p.json", tmp_path / "p.md", None)
    result = plan_for(Architecture.from_hf_config(QWEN_7B), default_settings(engine={"backend": "tensorrt_llm"}))
    assert any(p.startswith("engine.backend tensorrt_llm needs GPUs, but cluster.gpus_per_node is 0") for p in result["problems"])
    assert not result["fits"]


@pytest.mark.e2e
def test_plan_rule_runs_first_and_stops_a_config_that_cannot_fit(tmp_path, snakemake):
    done = snakemake(tmp_path / "fits", {}, "results/plan/plan.json")
    result = json.loads((tmp_path / "fits" / "results" / "plan" / "plan.json").read_text())
    assert result["fits"] and result["training"]["device_gib"] is None and result["training"]["host_per_node_gib"] < 16

    dry = snakemake(tmp_path / "fits", {}, "-n", "results/finetune/summary.json")
    assert "plan" not in dry.stdout.split("Job stats:")[1].split("\n\n")[0], "a passing plan is not rerun"

    stopped = snakemake(tmp_path / "tight", {"cluster": {"host_memory_gib": 0.5}}, check=False)
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0
    assert "training does not fit:" in out and "of host memory per node > cluster.host_memory_gib 0.5" in out
    assert not (tmp_path / "tight" / "results" / "bootstrap").exists() and not (tmp_path / "tight" / "results" / "data").exists()


@pytest.mark.e2e
def test_finetune_requests_gpus_per_node_times_nodes_and_one_task_per_node(tmp_path, snakemake):
    gpus = {"cluster": {"gpus_per_node": 8, "nodes": 2}, "finetune": {"liger_kernel": False}}  # liger-kernel is not installed here
    done = snakemake(tmp_path, gpus, "-n", "-p", "results/finetune/summary.json")
    block = done.stdout.split("rule finetune:")[1].split("\n\n")[0]
    resources = dict(item.split("=", 1) for item in block.split("resources:")[1].strip().splitlines()[0].split(", "))
    assert (resources["gpu"], resources["nodes"], resources["mpi"], resources["tasks"], resources["tasks_per_gpu"]) == ("16", "2", "srun", "2", "0")
    single = snakemake(tmp_path, {}, "-n", "results/finetune/summary.json").stdout.split("rule finetune:")[1].split("\n\n")[0]
    assert "gpu=0" in single and "mpi=" not in single and "tasks=" not in single


@pytest.mark.e2e
def test_bad_cluster_values_name_the_key(tmp_path, snakemake):
    done = snakemake(tmp_path, {"cluster": {"nodes": 0, "gpu_memory_gib": -1}}, "-n", check=False)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "config: cluster.nodes: Input should be greater than or equal to 1 (got 0)" in out
    assert "config: cluster.gpu_memory_gib: Input should be greater than 0 (got -1)" in out


def test_schemes_the_shapes_cannot_take_are_dropped_with_their_reason_and_the_others_go_on():
    width_576 = Architecture.from_hf_config(QWEN_7B | {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "vocab_size": 4096, "num_hidden_layers": 4,
                                                       "num_key_value_heads": 3})
    result = plan_for(width_576, default_settings())
    assert result["schemes"]["int4_awq"] == {"block": 64} and result["fits"]
    width_200 = Architecture.from_hf_config(QWEN_7B | {"hidden_size": 200, "intermediate_size": 800, "num_attention_heads": 5, "vocab_size": 4096, "num_hidden_layers": 4,
                                                       "num_key_value_heads": 5})
    result = plan_for(width_200, default_settings())
    assert result["schemes"]["fp8"]["dropped"] == "fp8 needs every linear layer's in-features divisible by 16 (this model: hidden_size 200, num_heads x head_dim 200)"
    assert result["schemes"]["int4_awq"]["dropped"].startswith("int4_awq needs every linear layer's in-features divisible by 128 or 64")
    assert set(result["serving"]) == {"bf16", "int8_sq"} and result["fits"], "the other schemes go on"
    none_left = plan_for(width_200, default_settings(quantize={"schemes": ["fp8", "int4_awq"]}))
    assert any(p.startswith("quantize.schemes ['fp8', 'int4_awq']: the model's shapes take none of them") for p in none_left["problems"])


@pytest.mark.parametrize("change, problem", [
    ({"evaluate": {"max_new_tokens": 512}}, "evaluate.max_new_tokens 512 > rollout.gateway.limits.max_tokens 256: "),
    ({"benchmark": {"output_len": 300}}, "benchmark.output_len 300 > rollout.gateway.limits.max_tokens 256: "),
    ({"data": {"max_seq_len": 2048}, "rollout": {"gateway": {"limits": {"max_prompt_tokens": 4096}}}},
     "data.max_seq_len 2048 > the model's max_position_embeddings 1024: "),
    ({"evaluate": {"max_new_tokens": 200}, "data": {"max_seq_len": 900}, "rollout": {"gateway": {"limits": {"max_prompt_tokens": 900}}}},
     "data.max_seq_len 900 + evaluate.max_new_tokens 200 = 1100 > the model's max_position_embeddings 1024: evaluation prompts plus "
     "their answers do not fit the engine; lower evaluate.max_new_tokens to 124, or lower data.max_seq_len to 824, or raise "
     "bootstrap.max_position_embeddings to 1100"),
    ({"benchmark": {"input_len": 1000, "output_len": 100}}, "benchmark.input_len 1000 + benchmark.output_len 100 = 1100 > the model's "),
    ({"finetune": {"attention": "varlen"}}, "finetune.attention varlen needs a CUDA GPU, but cluster.gpus_per_node is 0"),
    ({"engine": {"onnxruntime": {"execution_provider": "cuda"}}}, "engine.onnxruntime.execution_provider cuda needs GPUs"),
    ({"cluster": {"gpus_per_node": 2}, "finetune": {"precision": "bf16"}}, "finetune.liger_kernel true with cluster.gpus_per_node 2, but "
     "liger-kernel is not installed: install the GPU set-up"),
], ids=["eval-vs-gateway", "benchmark-vs-gateway", "data-vs-model", "eval-vs-engine", "benchmark-vs-engine", "varlen-on-cpu",
        "cuda-engine-on-cpu", "liger-not-installed"])
def test_a_config_that_cannot_run_is_refused_naming_both_keys_and_a_fix(change, problem):
    if "liger" in problem and importlib.util.find_spec("liger_kernel"):
        pytest.skip("liger-kernel is installed here")
    cfg = default_settings(**change)
    with pytest.raises(PlanError) as err:
        checked_plan(cfg)
    assert problem in str(err.value)
    lines = str(err.value).splitlines()[1:]
    also = ["data.max_seq_len 2048 + evaluate.max_new_tokens 96 = 2144 > the model's max_position_embeddings 1024"]  # rows too long for the model
    assert [line for line in lines if problem not in line and not any(a in line for a in also)] == []  # nothing else is wrong


def test_trt_lengths_are_checked_against_its_build_limits():
    cfg = default_settings(cluster={"gpus_per_node": 1}, finetune={"liger_kernel": False},
                           engine={"backend": "tensorrt_llm", "tensorrt_llm": {"max_input_len": 128, "max_seq_len": 4096}})
    problems = plan_for(Architecture.from_hf_config(QWEN_7B | {"max_position_embeddings": 2048}), cfg)["problems"]
    assert "benchmark.input_len 512 > engine.tensorrt_llm.max_input_len 128: longer prompts than the engine takes; set engine.tensorrt_llm.max_input_len: 512 (below max_seq_len)" in problems
    assert "engine.tensorrt_llm.max_seq_len 4096 > the model's max_position_embeddings 2048; set engine.tensorrt_llm.max_seq_len: 2048" in problems
