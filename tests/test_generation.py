"""workflow.generation: batch sizing from the memory model, length order, the resumable journal, and batched greedy
generation (on the CPU here; the GPU tests run on the lent H200 via benchmarks/gpu_dag.sh and skip without CUDA)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from workflow import generation
from workflow.capacity import GIB, Architecture, generation_memory
from workflow.config import Cluster
from workflow.generation import Journal, fitted_batch, longest_first, runtime_minutes, until_eos

LLAMA_8B = Architecture(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                        intermediate_size=14336)
H200 = Cluster(gpus_per_node=1, gpu_memory_gib=139, overhead_gib=2)


def test_generation_memory_counts_weights_and_the_static_cache():
    m = generation_memory(LLAMA_8B, 64, 1536, 512, 2, H200)
    # 8.03 B parameters in bf16; 64 x 1536 positions x 32 layers x (k + v) x 8 heads x 128 x 2 bytes.
    assert m["per_device_gib"]["weights"] == pytest.approx(8.03e9 * 2 / GIB, rel=0.01)
    assert m["per_device_gib"]["kv_cache"] == pytest.approx(64 * 1536 * 32 * 2 * 1024 * 2 / GIB, rel=1e-3)
    assert m["fits"] and m["device_gib"] < 139


def test_fitted_batch_is_the_largest_that_fits():
    batch = fitted_batch(LLAMA_8B, H200, 1536, 512, 2, prompts=10_000)
    assert generation_memory(LLAMA_8B, batch, 1536, 512, 2, H200)["fits"]
    assert not generation_memory(LLAMA_8B, batch + 1, 1536, 512, 2, H200)["fits"]
    assert fitted_batch(LLAMA_8B, H200, 1536, 512, 2, prompts=7) == 7  # never more than the prompts
    small = Cluster(gpus_per_node=1, gpu_memory_gib=24, overhead_gib=2)
    assert fitted_batch(LLAMA_8B, small, 1536, 512, 2, 10_000) < batch  # a smaller GPU: a smaller batch
    assert fitted_batch(LLAMA_8B, Cluster(gpus_per_node=1, gpu_memory_gib=8), 1536, 512, 2, 100) == 1  # nothing fits


def test_longest_first_keeps_equal_lengths_in_order():
    prompts = [[1], [1, 2, 3], [1, 2], [4, 5, 6], [7]]
    assert longest_first(prompts) == [1, 3, 2, 0, 4]


def test_until_eos_cuts_at_the_first_end_token():
    assert until_eos([5, 6, 2, 7, 2], {2}) == ([5, 6], True)
    assert until_eos([5, 6, 7], {2, 3}) == ([5, 6, 7], False)


def test_journal_resumes_its_own_work_only(tmp_path):
    path = tmp_path / "gen.partial.jsonl"
    first = Journal(path, "key-a")
    first.add({3: ([1, 2], True), 0: ([4], False)})
    with path.open("a") as handle:  # a job killed in the middle of a line
        handle.write('{"index": 5, "tok')
    again = Journal(path, "key-a")
    assert again.done == {3: ([1, 2], True), 0: ([4], False)}
    other = Journal(path, "key-b")  # another model or other prompts: start over
    assert other.done == {}
    assert json.loads(path.read_text().splitlines()[0]) == {"key": "key-b"}


def test_runtime_grows_with_the_tokens_and_is_shorter_on_a_gpu():
    assert runtime_minutes(10, 10, on_gpu=False) == 30
    r1 = runtime_minutes(200, 4096, on_gpu=True)
    assert r1 >= 200 * 4096 / generation.GPU_TOKENS_PER_S / 60
    assert runtime_minutes(200, 4096, on_gpu=False) > r1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.families import make

    model_dir = make("r1-distill-llama", tmp_path_factory.mktemp("family") / "m")
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def prompts_of(lengths):
    return [[(7 * i + j) % 400 + 20 for j in range(n)] for i, n in enumerate(lengths)]


def test_batched_generation_matches_one_at_a_time(tiny):
    prompts = prompts_of([5, 17, 9, 9, 30, 2])
    alone = [generation.generate(tiny, [p], 12, 1, pad_id=0, eos={-1}) for p in prompts]
    batched = generation.generate(tiny, prompts, 12, 4, pad_id=0, eos={-1})
    assert batched == [a[0] for a in alone]
    assert all(len(tokens) == 12 and not ended for tokens, ended in batched)


def test_generation_resumes_from_a_partial_journal(tiny, tmp_path):
    prompts = prompts_of([6, 11, 3, 8, 14])
    full = generation.generate(tiny, prompts, 8, 2, pad_id=0, eos={-1})
    path = tmp_path / "j.jsonl"
    journal = Journal(path, "k")
    journal.add({1: full[1], 4: full[4]})  # the longest two were finished before the job was killed
    calls = []
    original = tiny.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    tiny.generate = counting
    try:
        resumed = generation.generate(tiny, prompts, 8, 2, pad_id=0, eos={-1}, journal=Journal(path, "k"))
    finally:
        del tiny.generate
    assert resumed == full
    assert sum(calls) == 3  # only the three unfinished prompts were generated again
    assert len(path.read_text().splitlines()) == 1 + 5


def test_model_device_is_the_cpu_without_gpus():
    assert generation.model_device(Cluster()).type == "cpu"
    assert generation.model_dtype("unused", torch.device("cpu")) == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the lent H200)")
def test_static_cache_on_the_gpu_matches_the_cpu(tiny):
    prompts = prompts_of([5, 17, 9, 30, 2])
    cpu = generation.generate(tiny, prompts, 10, 2, pad_id=0, eos={-1})
    gpu_model = tiny.to("cuda")
    try:
        gpu = generation.generate(gpu_model, prompts, 10, 4, pad_id=0, eos={-1}, static_cache=True)
    finally:
        tiny.to("cpu")
    assert gpu == cpu  # fp32 on both: the static cache and the filled last batch change nothing


def test_packed_decoding_attention_equals_repeated_heads():
    """One query token against a masked cache: the grouped fold gives what repeating the key/value heads gives."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Layer(torch.nn.Module):
        num_key_value_groups = 4

    torch.manual_seed(0)
    query, key, value = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    mask = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., :4] = False  # a left-padded row
    mask[2, ..., 7:] = False  # a row whose static cache is not filled yet
    packed, _ = generation.packed_decode_attention(Layer(), query, key, value, mask, scaling=0.25)
    plain, _ = sdpa_attention_forward(Layer(), query, key, value, mask, scaling=0.25)
    assert packed.shape == plain.shape == (3, 1, 8, 16)
    torch.testing.assert_close(packed, plain)


def test_a_model_with_packed_attention_generates_the_same_tokens(tiny, tmp_path):
    generation.register_packed_attention()
    tiny.save_pretrained(tmp_path / "m")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32, attn_implementation=generation.PACKED).eval()
    assert tiny.config.num_key_value_heads < tiny.config.num_attention_heads  # grouped-query: the fold applies
    prompts = prompts_of([5, 17, 9, 30, 2])
    assert (generation.generate(packed, prompts, 10, 3, pad_id=0, eos={-1}, static_cache=True)
            == generation.generate(tiny, prompts, 10, 3, pad_id=0, eos={-1}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the lent H200)")
def test_packed_attention_compiled_on_the_gpu_matches_the_cpu(tiny, tmp_path):
    generation.register_packed_attention()
    tiny.save_pretrained(tmp_path / "m")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32, attn_implementation=generation.PACKED)
    prompts = prompts_of([5, 17, 9, 30, 2])
    cpu = generation.generate(tiny, prompts, 10, 2, pad_id=0, eos={-1})
    assert generation.generate(packed.to("cuda").eval(), prompts, 10, 4, pad_id=0, eos={-1}, static_cache=True) == cpu
