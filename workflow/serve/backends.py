"""What the gateway serves: an opened package in this process, or an upstream OpenAI-compatible engine server.

In-process: the package is verified and decrypted into a memory-backed folder, the engine and tokenizer are
loaded from it, and the plaintext folder is deleted again. Upstream: `trtllm-serve` or vLLM on GPU nodes, which
open the package themselves (the Kubernetes manifests' init container); the gateway only forwards.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx2

from workflow.chat import prompt_ids
from workflow.engine.build import load_engine
from workflow.engine.manifest import EngineManifest
from workflow.package import archive

log = logging.getLogger(__name__)


class NotReady(RuntimeError):
    """No model is loaded (still loading, undeployed, or the load failed)."""


def context_length(model_dir: Path) -> int:
    """Prompt plus generated tokens the engine can hold (ONNX Runtime GenAI's genai_config, else config.json)."""
    genai = model_dir / "genai_config.json"
    if genai.exists():
        return json.loads(genai.read_text())["model"]["context_length"]
    config = json.loads((model_dir / "config.json").read_text())
    return config.get("max_position_embeddings") or config["max_seq_len"]


class InProcess:
    """An engine opened from a package, generating greedily; loads in a background thread."""

    kind = "in_process"

    def __init__(self, engine_settings: dict, memory_dir: str = "/dev/shm") -> None:
        self.engine_settings, self.memory_dir = engine_settings, memory_dir
        self.engine = self.tokenizer = None
        self.package: dict = {}
        self.error: str | None = None
        self._lock = threading.Lock()

    def load(self, package: str | Path, trusted, kms) -> None:
        """Open, load, then swap in atomically: requests keep using the old model until the new one is ready."""
        opened = Path(tempfile.mkdtemp(prefix="ft2prod-", dir=self.memory_dir))
        try:
            archive.open_package(package, trusted, kms, into=opened)
            self.load_opened(opened, {"path": str(package), "sha256": archive.digest(package)})
        finally:
            shutil.rmtree(opened, ignore_errors=True)  # loaded engines keep their own copy (or mapping)

    def load_opened(self, model_dir: str | Path, info: dict | None = None) -> None:
        """Load an engine folder already opened from a package (by the Kubernetes init container)."""
        from transformers import AutoTokenizer

        manifest = EngineManifest.read(model_dir)
        engine = load_engine(model_dir, manifest.target.backend, self.engine_settings)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        info = (info or {"path": str(model_dir)}) | {"scheme": manifest.scheme, "precision": manifest.precision,
                                                     "backend": manifest.target.backend,
                                                     "context_length": context_length(Path(model_dir))}
        with self._lock:
            self.engine, self.tokenizer, self.package, self.error = engine, tokenizer, info, None
        log.info("serving %s (%s)", info["path"], info["scheme"])

    def load_in_background(self, load, *args) -> threading.Thread:
        """Run `load(*args)` (self.load or self.load_opened) in a thread; /readyz reports its failure."""
        def run() -> None:
            try:
                load(*args)
            except Exception as err:  # reported by /readyz and the deploy endpoint's caller via the log
                log.exception("loading %s failed", args[0])
                self.error = f"{type(err).__name__}: {err}"

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def unload(self) -> None:
        with self._lock:
            self.engine = self.tokenizer = None
            self.package = {}

    def ready(self) -> bool:
        return self.engine is not None

    def current(self):
        with self._lock:
            if self.engine is None:
                raise NotReady(self.error or "no model loaded")
            return self.engine, self.tokenizer

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        _, tokenizer = self.current()
        return prompt_ids(tokenizer, messages)

    def text_prompt(self, prompt: str) -> list[int]:
        _, tokenizer = self.current()
        return tokenizer(prompt, add_special_tokens=False).input_ids

    def generate(self, prompt_ids: list[int], max_tokens: int) -> Iterator[tuple[str, str | None, int]]:
        """(text delta, finish reason or None, tokens so far) per step; the last step's reason is 'stop' (end of
        sequence) or 'length'. Text is decoded incrementally over a short window of tokens (as vLLM and TGI do),
        holding back a delta while it ends in an incomplete multi-byte character."""
        engine, tokenizer = self.current()
        tokens, prefix_offset, read_offset = [], 0, 0

        def pending() -> str:
            before = tokenizer.decode(tokens[prefix_offset:read_offset], skip_special_tokens=True)
            return tokenizer.decode(tokens[prefix_offset:], skip_special_tokens=True)[len(before):]

        for token in engine.stream(prompt_ids, max_tokens):
            if token == tokenizer.eos_token_id:
                yield pending(), "stop", len(tokens)
                return
            tokens.append(token)
            delta = pending()
            if delta and not delta.endswith("\ufffd"):
                prefix_offset, read_offset = read_offset, len(tokens)
                yield delta, None, len(tokens)
        yield pending(), "length", len(tokens)


class Upstream:
    """An OpenAI-compatible engine server (trtllm-serve, vLLM) the gateway forwards to."""

    kind = "upstream"

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}  # the engine server's own key, not the caller's
        self.client = httpx2.AsyncClient(base_url=self.url, timeout=timeout_s, headers=headers)
        self.package = {"upstream": self.url}

    async def ready_async(self) -> bool:
        try:
            return (await self.client.get("/v1/models", timeout=2.0)).status_code == 200
        except httpx2.HTTPError:
            return False

    async def forward(self, path: str, body: dict):
        """(status, JSON) for plain requests, or (status, async byte iterator) for streams."""
        request = self.client.build_request("POST", path, json=body)
        response = await self.client.send(request, stream=bool(body.get("stream")))
        if body.get("stream") and response.status_code == 200:
            async def relay():
                try:
                    async for chunk in response.aiter_raw():
                        yield chunk
                finally:
                    await response.aclose()

            return response.status_code, relay()
        await response.aread()
        return response.status_code, response.json()

    async def models(self) -> dict:
        response = await self.client.get("/v1/models")
        response.raise_for_status()
        return response.json()
