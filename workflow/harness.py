"""evaluate.metric lm_eval: an lm-evaluation-harness task from a local YAML over local data, run offline.

    from workflow.harness import run_task, hf_model; run_task(hf_model(model, tokenizer, 8), cfg)

The task is found in evaluate.lm_eval.include_path; it runs against the model in memory (the fine-tuned, base or
quantized model, through lm-eval's HFLM) or a built engine (EngineLM, generate_until tasks), with HF_HUB_OFFLINE and
HF_DATASETS_OFFLINE set and a throw-away datasets cache, so nothing reaches a hub and nothing is left behind. The
score the gate reads is the task's `metric,filter` result; per-document prompts, targets, generations and scores
come back as rows for the reports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from workflow.engine.interface import GenerationRequest
from workflow.metrics import END_THINK, MetricError

log = logging.getLogger(__name__)

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def task_manager(task_cfg):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(Path(task_cfg.include_path).resolve()), include_defaults=False)


def check_task(task_cfg) -> None:
    """evaluate.lm_eval names a folder and a task defined in it; MetricError names the key otherwise."""
    if not task_cfg.include_path or not task_cfg.task:
        raise MetricError("evaluate.lm_eval.include_path (a folder of task YAML files) and evaluate.lm_eval.task (the "
                          "name of one of its tasks) are required when evaluate.metric is lm_eval")
    folder = Path(task_cfg.include_path)
    if not folder.is_dir():
        raise MetricError(f"evaluate.lm_eval.include_path {str(folder)!r} is not a folder (of lm-eval task YAML files)")
    found = task_manager(task_cfg).all_tasks
    if task_cfg.task not in found:
        raise MetricError(f"evaluate.lm_eval.task {task_cfg.task!r} is not defined in {folder}; tasks found there: "
                          f"{', '.join(found) or 'none'}")


@contextlib.contextmanager
def offline():
    """Hub access off and a private datasets cache for the duration, previous settings restored. datasets and
    huggingface_hub read their environment once, at import, so their settings are switched as well."""
    import datasets.config
    import huggingface_hub.constants

    with tempfile.TemporaryDirectory(prefix="lm_eval-datasets-") as cache:
        settings = [(os.environ, key, value) for key, value in (OFFLINE | {"HF_DATASETS_CACHE": cache}).items()]
        settings += [(vars(datasets.config), "HF_DATASETS_CACHE", Path(cache)), (vars(datasets.config), "HF_HUB_OFFLINE", True),
                     (vars(datasets.config), "HF_DATASETS_OFFLINE", True),
                     (vars(huggingface_hub.constants), "HF_HUB_OFFLINE", True)]
        saved = [(where, key, where.get(key)) for where, key, _ in settings]
        for where, key, value in settings:
            where[key] = value
        try:
            yield
        finally:
            for where, key, value in saved:
                if value is None:
                    where.pop(key, None)
                else:
                    where[key] = value


def hf_model(model, tokenizer, batch_size: int):
    """lm-eval's HFLM around a model in memory (answers read after </think>)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device),
                think_end_token=END_THINK)


def run_task(lm, cfg) -> tuple[dict, list[dict]]:
    """The task's score as {"accuracy": value, "samples": n} and a row per document (cfg: EvalConfig)."""
    import lm_eval

    task_cfg = cfg.lm_eval
    with offline():
        out = lm_eval.simple_evaluate(model=lm, tasks=[task_cfg.task], task_manager=task_manager(task_cfg),
                                      num_fewshot=task_cfg.num_fewshot, limit=cfg.max_samples, log_samples=True,
                                      apply_chat_template=task_cfg.apply_chat_template, bootstrap_iters=0)
    scores, key = out["results"][task_cfg.task], f"{task_cfg.metric},{task_cfg.filter}"
    if key not in scores:
        reported = sorted(k for k in scores if "," in k and "_stderr" not in k)
        raise MetricError(f"lm_eval task {task_cfg.task!r} reports no {key!r} (evaluate.lm_eval.metric and "
                          f"evaluate.lm_eval.filter); it reports: {', '.join(reported)}")
    rows = [sample_row(sample, task_cfg.metric) for sample in out["samples"][task_cfg.task]
            if sample["filter"] == task_cfg.filter]
    return {"accuracy": float(scores[key]), "samples": len(rows)}, rows


def sample_row(sample: dict, metric: str) -> dict:
    """One logged lm-eval document as a report row."""
    score = float(sample[metric])
    generation = sample["resps"][0][0] if sample["resps"] and sample["resps"][0] else ""
    return {"prompt": str(sample["arguments"][0][0]), "reference": str(sample["target"]),
            "generation": str(generation), "answer": str(sample["filtered_resps"][0]), "score": score,
            "correct": score >= 1.0}


def engine_model(engine, tokenizer):
    """An lm-eval model around a built engine (workflow.engine.interface.Engine): generate_until tasks only."""
    from lm_eval.api.model import LM
    from lm_eval.models.utils import postprocess_generated_text

    class EngineLM(LM):
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            # The tokenizer stays on this thread (a fast tokenizer shared between threads can fail "Already borrowed").
            prompts = [tokenizer(r.args[0], add_special_tokens=False).input_ids for r in requests]
            budgets = [int(r.args[1].get("max_gen_toks", 256)) for r in requests]

            def one(ids: list[int], budget: int) -> list[int]:
                tokens = []
                for token in engine.stream(GenerationRequest(ids, budget)):
                    if token == tokenizer.eos_token_id:
                        break
                    tokens.append(token)
                return tokens

            with ThreadPoolExecutor(engine.max_batch_size) as pool:
                generated = list(pool.map(one, prompts, budgets))
            return [postprocess_generated_text(tokenizer.decode(tokens, skip_special_tokens=True),
                                               r.args[1].get("until"), END_THINK)
                    for r, tokens in zip(requests, generated, strict=True)]

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            raise MetricError("evaluate.lm_eval.task: an engine answers generate_until tasks only (it gives no "
                              "log-likelihoods); use a task with output_type generate_until")

        loglikelihood_rolling = loglikelihood

        @property
        def tokenizer_name(self) -> str:
            return getattr(tokenizer, "name_or_path", "engine").replace("/", "__")

        def chat_template(self, chat_template=False) -> str | None:
            return tokenizer.chat_template

        def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
            return tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    return EngineLM()
