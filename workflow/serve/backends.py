"""What the gateway serves: an opened package in this process, or an upstream OpenAI-compatible engine server.

In-process: the package is verified and decrypted into a memory-backed folder, the engine and tokenizer are
loaded from it, and the plaintext folder is deleted again. Upstream: `trtllm-serve` or vLLM on GPU nodes, which
open the package themselves (the Kubernetes manifests' init container); the gateway only forwards.

Both have one interface, which the gateway's routes call: start, is_ready, not_ready_reason, serving, models,
complete (a chat or text completion), deploy and undeploy.
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
from fastapi.responses import JSONResponse, StreamingResponse

from workflow.chat import TemplateError, prompt_text
from workflow.config import EngineConfig
from workflow.engine.interface import Engine, GenerationRequest
from workflow.engine.manifest import EngineManifest
from workflow.engine.runtime import load_engine
from workflow.engine.sampling import generation_defaults
from workflow.package import archive
from workflow.serve.deployments import Deployments, package_path
from workflow.serve.output import ReasoningSplit
from workflow.serve.protocol import BadRequest, ModelCard, ModelList, respond, sampling_params, upstream_body

log = logging.getLogger(__name__)


class NotReady(RuntimeError):
    """No model is loaded (still loading, undeployed, or the load failed)."""


class UpstreamError(RuntimeError):
    """The upstream engine server did not answer, failed (5xx) or answered with something other than a JSON object:
    the gateway answers 502 in its own error shape, never the engine's bytes as its own 500."""


def context_length(model_dir: Path) -> int:
    """Prompt plus generated tokens the engine can hold (ONNX Runtime GenAI's genai_config, else config.json)."""
    genai = model_dir / "genai_config.json"
    if genai.exists():
        return json.loads(genai.read_text())["model"]["context_length"]
    config = json.loads((model_dir / "config.json").read_text())
    return config.get("max_position_embeddings") or config["max_seq_len"]


class InProcess:
    """An engine opened from a package, sampling as each request asks (greedy by default unless the model's
    generation_config.json samples); loads in a background thread."""

    kind = "in_process"

    def __init__(self, engine_settings: EngineConfig, memory_dir: str = "/dev/shm") -> None:
        self.engine_settings, self.memory_dir = engine_settings, memory_dir
        self.engine: Engine | None = None
        self.tokenizer = None
        self.package: dict = {}
        self.error: str | None = None
        self._lock = threading.Lock()
        self._loading = threading.Lock()
        """Held while a package loads: one load at a time (each needs the plaintext model in memory)."""
        self.deployments: Deployments | None = None

    def start(self, settings, package: str | None = None, model_dir: str | None = None,
              deployments: Deployments | None = None) -> None:
        """Begin loading the package (encrypted) or the folder (already opened) given at start, if any; a package
        older than the anti-rollback floor (`deployments`) is refused as a deploy would be."""
        self.deployments = deployments
        if package:
            self.load_in_background(self.load, package, settings.trusted_signer(), settings.kms())
        elif model_dir:
            self.load_in_background(self.load_folder, model_dir)

    async def is_ready(self) -> bool:
        return self.ready()

    def serving(self) -> bool:
        return self.ready()

    def not_ready_reason(self) -> str:
        """What /readyz tells anyone: the failure's kind, never its text (paths, key ids); the log has the rest."""
        return f"load failed ({self.error.split(':')[0]}); see the gateway log" if self.error else "loading"

    async def models(self, settings) -> ModelList:
        self.current()
        return ModelList(object="list", data=[ModelCard(id=settings.model_name, object="model", created=0, owned_by="ft2prod",
                                                        package_sha256=self.package.get("sha256"))])

    async def complete(self, kind: str, req, state: dict, settings):
        """A chat ("chat") or text ("text") completion from the loaded engine: sampled with the request's settings,
        else the model's defaults; a chat answer's think block split off unless rollout.gateway.reasoning is raw."""
        _, tokenizer = self.current()
        opens_think = None
        if kind == "chat":
            text = self.chat_text([m.model_dump(exclude_none=True) for m in req.messages])
            prompt = tokenizer(text, add_special_tokens=False).input_ids
            opens_think = ReasoningSplit.opens_think(text) if settings.reasoning == "split" else None
        else:
            prompt = self.text_prompt(req.prompt)
        sampling = sampling_params(req, self.package.get("sampling_defaults", {}), len(tokenizer))
        return await respond(req, kind, prompt, self.package["context_length"], self.generate, state, settings,
                             sampling, opens_think)

    def deploy(self, package_sha256: str, rollback: bool, settings) -> None:
        """Load the package `package_sha256` from the package root, if this gateway may serve it now (see
        deployments.py); 409 while another package is loading. The signed manifest is read and checked once, here, and
        the load opens by what was checked (not by the folder read again): a package swapped in between fails to
        decrypt under the checked header's key and digests, and is refused, not served."""
        path = package_path(settings.package_root, package_sha256)
        trusted = settings.trusted_signer()
        signed = self.checked(path, trusted, package_sha256, rollback)
        self.load_in_background(self.load, path, trusted, settings.kms(), signed)

    def checked(self, path: Path, trusted, expect: str | None, rollback: bool) -> archive.Signed:
        """The package's signed parts, read once, if it is the package `expect` (when given) and not older than the
        floor; BadRequest (409) otherwise."""
        try:
            signed = archive.signed_package(Path(path), trusted)
        except archive.PackageError as err:
            raise BadRequest(f"package {str(expect or path)[:16]}… is refused: {type(err).__name__}", 409) from None
        if expect and signed.sha256 != expect:
            raise BadRequest(f"the package stored as {expect[:16]}… has another digest: refusing it", 409)
        self.deployments.check(signed.sha256, signed.header.get("created", ""), rollback)
        return signed

    def undeploy(self, package_sha256: str) -> None:
        if package_sha256 != self.package.get("sha256"):
            raise BadRequest(f"package_sha256 {package_sha256[:16]}… is not the served package "
                             f"({str(self.package.get('sha256'))[:16]}…); GET /v1/deployment shows it", 409)
        self.unload()

    def load(self, package: str | Path, trusted, kms, signed: archive.Signed | None = None) -> None:
        """Check (signature, floor) unless deploy did (`signed`), open exactly what was checked, load, then swap in
        atomically: requests keep using the old model until the new one is ready."""
        signed = signed or self.checked(Path(package), trusted, None, rollback=False)
        created = signed.header.get("created", "")
        opened = Path(tempfile.mkdtemp(prefix="ft2prod-", dir=self.memory_dir))
        try:
            archive.open_package(package, trusted, kms, into=opened, signed=signed)
            self.load_opened(opened, {"path": str(package), "sha256": signed.sha256, "created": created})
            self.deployments.record(signed.sha256, created)
        finally:
            shutil.rmtree(opened, ignore_errors=True)  # loaded engines keep their own copy (or mapping)

    def load_folder(self, model_dir: str | Path) -> None:
        """Load the folder given at start, opened from a package by the Kubernetes init container, and record that
        package as served (server.check_floor checked its age before the gateway started)."""
        opened = archive.opened_from(model_dir)
        self.load_opened(model_dir, {"path": str(model_dir)} | opened)
        self.deployments.record(opened["sha256"], opened["created"])

    def load_opened(self, model_dir: str | Path, info: dict) -> None:
        """Load an engine folder opened from a package; `info` says which (path, sha256, created)."""
        from transformers import AutoTokenizer

        engine = load_engine(model_dir, self.engine_settings)
        manifest: EngineManifest = engine.manifest
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        info = info | {"scheme": manifest.scheme, "precision": manifest.precision, "backend": manifest.target.backend,
                       "context_length": context_length(Path(model_dir)), "sampling_defaults": generation_defaults(model_dir)}
        with self._lock:  # the old engine is freed when its last request in flight ends (they hold it)
            self.engine, self.tokenizer, self.package, self.error = engine, tokenizer, info, None
        log.info("serving %s (%s)", info["path"], info["scheme"])

    def load_in_background(self, load, *args) -> threading.Thread:
        """Run `load(*args)` (self.load or self.load_folder) in a thread, one load at a time (409 while one runs);
        /readyz reports its failure."""
        if not self._loading.acquire(blocking=False):
            raise BadRequest("a package is loading; wait until GET /v1/deployment shows it, then deploy again", 409)

        def run() -> None:
            try:
                load(*args)
            except Exception as err:  # reported by /readyz and the deploy endpoint's caller via the log
                log.exception("loading %s failed", args[0])
                self.error = f"{type(err).__name__}: {err}"
            finally:
                self._loading.release()

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
                raise NotReady(self.not_ready_reason() if self.error else "no model loaded")
            return self.engine, self.tokenizer

    def chat_text(self, messages: list[dict]) -> str:
        """The prompt as the model's chat template renders it (tokenized without special tokens added)."""
        _, tokenizer = self.current()
        try:
            return prompt_text(tokenizer, messages)
        except TemplateError as err:  # e.g. a system message to a model whose template has no system role
            raise BadRequest(str(err)) from None

    def text_prompt(self, prompt: str) -> list[int]:
        _, tokenizer = self.current()
        return tokenizer(prompt, add_special_tokens=False).input_ids

    def generate(self, request: GenerationRequest) -> Iterator[tuple[str, str | None, int]]:
        """(text delta, finish reason or None, tokens so far) per step; the last step's reason is 'stop' (end of
        sequence) or 'length'. The engine is asked at once, so what it refuses (e.g. a logit bias TensorRT-LLM is not
        given) is a 400 before any answer starts."""
        engine, tokenizer = self.current()
        try:
            tokens = engine.stream(request)
        except ValueError as err:
            raise BadRequest(str(err).removeprefix("generate: ")) from None
        return self.decoded(tokens, tokenizer)

    @staticmethod
    def decoded(tokens: Iterator[int], tokenizer) -> Iterator[tuple[str, str | None, int]]:
        """Text decoded incrementally over a short window of tokens (as vLLM and TGI do), holding back a delta while it
        ends in an incomplete multi-byte character."""
        done, prefix_offset, read_offset = [], 0, 0

        def pending() -> str:
            before = tokenizer.decode(done[prefix_offset:read_offset], skip_special_tokens=True)
            return tokenizer.decode(done[prefix_offset:], skip_special_tokens=True)[len(before):]

        try:
            for token in tokens:
                if token == tokenizer.eos_token_id:
                    yield pending(), "stop", len(done)
                    return
                done.append(token)
                delta = pending()
                if delta and not delta.endswith("\ufffd"):
                    prefix_offset, read_offset = read_offset, len(done)
                    yield delta, None, len(done)
            yield pending(), "length", len(done)
        finally:
            close = getattr(tokens, "close", None)
            if close:
                close()  # a request cut at a stop string frees its batch slot now


class Upstream:
    """An OpenAI-compatible engine server (trtllm-serve, vLLM) the gateway forwards to."""

    kind = "upstream"

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}  # the engine server's own key, not the caller's
        self.client = httpx2.AsyncClient(base_url=self.url, timeout=timeout_s, headers=headers)
        self.package = {"upstream": self.url}

    def start(self, settings, package: str | None = None, model_dir: str | None = None, deployments=None) -> None:
        """Nothing to load: the engine server serves the folder the init container opened, recorded here as served
        (server.check_floor checked its age before the gateway started)."""
        if model_dir:
            opened = archive.opened_from(model_dir)
            deployments.record(opened["sha256"], opened["created"])

    async def is_ready(self) -> bool:
        try:
            return (await self.client.get("/v1/models", timeout=2.0)).status_code == 200
        except httpx2.HTTPError:
            return False

    def serving(self) -> bool:
        return True  # readiness is the engine server's: /readyz asks it

    def not_ready_reason(self) -> str:
        return "the engine server does not answer"

    async def complete(self, kind: str, req, state: dict, settings):
        """Forward the request, re-written from what the gateway parsed with its limits applied, and relay the answer."""
        status, answer = await self.forward("/v1/chat/completions" if kind == "chat" else "/v1/completions",
                                            upstream_body(req, settings.limits))
        if isinstance(answer, dict):
            usage = answer.get("usage") or {}
            state["prompt_tokens"], state["completion_tokens"] = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            return JSONResponse(answer, status)
        return StreamingResponse(answer, status, media_type="text/event-stream")

    def deploy(self, package_sha256: str, rollback: bool, settings) -> None:
        raise BadRequest("this gateway forwards to an upstream engine server: deploy the package there", 409)

    def undeploy(self, package_sha256: str) -> None:
        raise BadRequest("this gateway forwards to an upstream engine server: undeploy it there", 409)

    async def forward(self, path: str, body: dict):
        """(status, JSON) for plain requests, or (status, async byte iterator) for streams."""
        request = self.client.build_request("POST", path, json=body)
        try:
            response = await self.client.send(request, stream=bool(body.get("stream")))
        except httpx2.HTTPError as err:
            raise UpstreamError(f"the engine server did not answer ({type(err).__name__})") from None
        if body.get("stream") and response.status_code == 200:
            async def relay():
                try:
                    async for chunk in response.aiter_raw():
                        yield chunk
                finally:
                    await response.aclose()

            return response.status_code, relay()
        await response.aread()
        return response.status_code, relayable(response)

    async def models(self, settings) -> dict:
        try:
            response = await self.client.get("/v1/models")
        except httpx2.HTTPError as err:
            raise UpstreamError(f"the engine server did not answer ({type(err).__name__})") from None
        answer = relayable(response)
        if response.status_code != 200:
            raise UpstreamError(f"the engine server answered {response.status_code} to GET /v1/models")
        return answer


def relayable(response: httpx2.Response) -> dict:
    """An upstream answer the gateway may pass on: a JSON object with a status below 500 (an engine's own 4xx, such
    as a prompt over its context, reaches the client as the engine wrote it); else UpstreamError."""
    try:
        answer = response.json()
    except ValueError:  # not JSON, or not UTF-8
        answer = None
    if response.status_code >= 500 or not isinstance(answer, dict):
        kind = "a JSON object" if isinstance(answer, dict) else f"a body that is not a JSON object ({response.headers.get('content-type', 'no content type')})"
        raise UpstreamError(f"the engine server answered {response.status_code} with {kind}")
    return answer
