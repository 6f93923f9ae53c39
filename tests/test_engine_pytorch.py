"""The PyTorch engine (workflow/engine/pytorch.py) on a tiny Qwen2 model with the R1-distill template, on the CPU
here (the same code serves bf16 on the lent H200 in benchmarks/gpu_dag.sh): what it builds, that a batch gives
each request the tokens it gets alone, greedy and seeded, that an abandoned request frees its row, and its refusals."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import families
from workflow import generation
from workflow.engine.interface import Engine, GenerationRequest
from workflow.engine.manifest import EngineManifest, EngineMismatch
from workflow.engine.pytorch import PytorchEngine, build
from workflow.engine.sampling import SamplingParams
from workflow.schemes import BASELINE, SCHEMES

QUANTIZED = next(name for name, s in SCHEMES.items() if not s.baseline)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pytorch")
    model = families.make("r1-distill-qwen", root / "model")
    build(model, root / "engine", BASELINE, torch.device("cpu"), "sha")
    return root / "engine"


CPU = torch.device("cpu")  # also on a GPU host: fp32, where batched and alone give the same greedy tokens


@pytest.fixture(scope="module")
def engine(engine_dir):
    loaded = PytorchEngine(engine_dir, max_batch_size=4, device=CPU)
    yield loaded
    loaded.close()


def prompts(n: int) -> list[list[int]]:
    return [[(5 * i + j) % 300 + 20 for j in range(3 + 4 * i)] for i in range(n)]


def test_the_engine_folder_holds_the_checkpoint_and_its_manifest(engine_dir, engine):
    manifest = EngineManifest.read(engine_dir)
    assert (manifest.scheme, manifest.target.backend, manifest.target.device) == (BASELINE, "pytorch", "cpu")
    assert manifest.algorithm == "none: unquantized weights"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in engine_dir.iterdir()}
    assert isinstance(engine, Engine)


def test_batched_requests_get_what_each_gets_alone(engine):
    asked = [GenerationRequest(p, max_new_tokens=6 + i, min_new_tokens=6 + i) for i, p in enumerate(prompts(4))]
    alone = [list(engine.stream(r)) for r in asked]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda r: list(engine.stream(r)), asked))
    assert together == alone
    assert [len(t) for t in alone] == [6, 7, 8, 9]  # min_new_tokens held each to its length
    # greedy, alone: what workflow.generation's batched greedy generation gives
    reference = generation.generate(engine.model, [list(asked[0].prompt_ids)], 6, 1, pad_id=engine.pad_id, eos={-1})
    assert alone[0] == reference[0][0]


def test_a_seed_gives_the_same_tokens_whoever_shares_the_batch(engine):
    def sampled(seed):
        return GenerationRequest(prompts(1)[0], max_new_tokens=12, min_new_tokens=12,
                                 sampling=SamplingParams(temperature=1.5, top_p=0.95, seed=seed))

    alone = list(engine.stream(sampled(7)))
    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda r: list(engine.stream(r)), [sampled(7), sampled(8), GenerationRequest(prompts(3)[2], 12)]))
    assert runs[0] == alone and runs[1] != alone


def test_an_abandoned_request_frees_its_row(engine):
    long = engine.stream(GenerationRequest(prompts(1)[0], max_new_tokens=200, min_new_tokens=200))
    next(long)
    long.close()  # the client went away after one token
    done = threading.Event()
    threading.Thread(target=lambda: (list(engine.stream(GenerationRequest(prompts(2)[1], 4))), done.set())).start()
    assert done.wait(60)


def test_refusals_name_what_is_wrong(engine, engine_dir, tmp_path):
    with pytest.raises(ValueError, match="context length"):
        engine.stream(GenerationRequest([1, 2, 3], max_new_tokens=engine.context_length))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.stream(GenerationRequest([1, 2], 2, sampling=SamplingParams(logit_bias={10**9: 1.0})))
    with pytest.raises(ValueError, match="unquantized baseline"):
        build(engine_dir, tmp_path / "fp8", QUANTIZED, torch.device("cpu"), "sha")
    moved = tmp_path / "gpu-engine"
    moved.mkdir()
    manifest = json.loads((engine_dir / "engine_manifest.json").read_text())
    manifest["target"]["device"] = "cuda"
    (moved / "engine_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatch, match="built for 'cuda'"):
        PytorchEngine(moved, device=CPU)


def test_a_closed_engine_refuses_new_requests(engine_dir):
    engine = PytorchEngine(engine_dir, max_batch_size=2, device=CPU)
    engine.close()
    with pytest.raises(RuntimeError, match="unloaded"):
        engine.stream(GenerationRequest([1, 2, 3], 2))
