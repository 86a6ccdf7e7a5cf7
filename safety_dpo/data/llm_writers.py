"""Prompt writers backed by a language model: local (`transformers`) or an OpenAI-compatible server.

Both render the instructions template (`safety_dpo/data/templates/prompt_pairs.jinja`, or a file of the user's),
ask for JSON (`{"pairs": [{"unsafe": ..., "safe": ...}]}`), parse the answer and try again, up to `max_attempts`
times, when it is empty or not JSON. Unusable answers are counted by reason, never raised: one bad answer does not
stop a long build. A server that stays unreachable after its retries raises `PromptWriterError`.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from safety_dpo.data.writer_base import PairRequest, PromptWriterError, WrittenPairs

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTIONS = "prompt_pairs.jinja"

# Reasons an answer, or an item of it, is unusable; they join the build's rejection counts.
EMPTY_ANSWER = "empty_answer"
NOT_JSON = "not_json"
MALFORMED_ANSWER = "malformed_answer"
MALFORMED_PAIR = "malformed_pair"

_UNSAFE_KEYS = ("unsafe", "unsafe_prompt")
_SAFE_KEYS = ("safe", "safe_prompt")


def read_instructions(instructions: str | os.PathLike | None = None) -> str:
    """The instructions template's text: the packaged one, or the Jinja file at `instructions`."""
    if instructions is None:
        packaged = importlib.resources.files("safety_dpo.data") / "templates" / DEFAULT_INSTRUCTIONS
        return packaged.read_text(encoding="utf-8")
    path = Path(instructions).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"instructions={str(instructions)!r} is not a file; pass a Jinja template file.")
    return path.read_text(encoding="utf-8")


def render_instructions(template: str, request: PairRequest) -> str:
    """Fill the instructions template for one request (variables: see the packaged template)."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    environment = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    return environment.from_string(template).render(
        category=request.category.id,
        category_description=request.category.description,
        concept=request.concept.id,
        names=list(request.concept.names),
        concept_description=request.concept.description,
        counterpart=request.counterpart,
        forbidden=list(request.concept.all_names),
        num_pairs=request.num_pairs,
    )


def parse_pairs_answer(answer: str | None) -> tuple[list[tuple[str, str]], Counter[str]]:
    """Read (unsafe, safe) tuples from a model's answer.

    Accepts `{"pairs": [...]}` or a bare list, optionally inside a Markdown code fence or surrounded by text; items
    are `{"unsafe": ..., "safe": ...}` (or `unsafe_prompt`/`safe_prompt`).

    Returns:
        The tuples and the unusable parts by reason: `empty_answer` (no text, or no pairs), `not_json`,
        `malformed_answer` (JSON, but not a list of pairs) once per answer; `malformed_pair` once per bad item.
    """
    rejections: Counter[str] = Counter()
    if answer is None or not answer.strip():
        rejections[EMPTY_ANSWER] += 1
        return [], rejections
    data = _load_json(answer)
    if data is None:
        rejections[NOT_JSON] += 1
        return [], rejections
    items = data.get("pairs") if isinstance(data, dict) else data
    if not isinstance(items, list):
        rejections[MALFORMED_ANSWER] += 1
        return [], rejections
    if not items:
        rejections[EMPTY_ANSWER] += 1
        return [], rejections
    candidates = []
    for item in items:
        unsafe = _first_string(item, _UNSAFE_KEYS)
        safe = _first_string(item, _SAFE_KEYS)
        if unsafe is None or safe is None:
            rejections[MALFORMED_PAIR] += 1
        else:
            candidates.append((unsafe, safe))
    return candidates, rejections


class ChatPromptWriter:
    """What both language-model writers share: instructions, retries on unusable answers, parsing.

    Subclasses implement `_complete(messages, seed) -> str`.
    """

    name = "chat"

    def __init__(
        self,
        instructions: str | os.PathLike | None = None,
        max_attempts: int = 3,
        temperature: float = 0.8,
        max_new_tokens: int = 1024,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}.")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}.")
        self.instructions = read_instructions(instructions)
        self.max_attempts = max_attempts
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens

    def write(self, request: PairRequest) -> WrittenPairs:
        messages = [{"role": "user", "content": render_instructions(self.instructions, request)}]
        result = WrittenPairs()
        for attempt in range(self.max_attempts):
            candidates, rejections = parse_pairs_answer(self._complete(messages, request.seed + attempt))
            result.rejections.update(rejections)
            if candidates:
                result.candidates.extend(candidates)
                break
            logger.info("%s: unusable answer for %r (%s), asking again", self.name, request.concept.id, rejections)
        return result

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "instructions_sha256": hashlib.sha256(self.instructions.encode()).hexdigest(),
            "max_attempts": self.max_attempts,
            "temperature": self.temperature,
            "max_new_tokens": self.max_new_tokens,
        }

    def _complete(self, messages: list[dict[str, str]], seed: int) -> str:
        raise NotImplementedError


class TransformersPromptWriter(ChatPromptWriter):
    """Write pairs with a chat/instruct causal LM through the `transformers` text-generation pipeline.

    Args:
        model: A local path or Hub id of the model, or a ready `transformers` text-generation pipeline. Remote code
            is never trusted.
        instructions: A Jinja file replacing the packaged instructions.
        max_attempts: Answers asked for per request when they are unusable.
        temperature: Sampling temperature (0 = greedy).
        max_new_tokens: Length limit of an answer.
        device: Passed to `transformers.pipeline` (e.g. "cuda", 0); None lets transformers choose.
        dtype: Passed to `transformers.pipeline` (e.g. "bfloat16"); None keeps the checkpoint's.
    """

    def __init__(
        self,
        model: Any,
        instructions: str | os.PathLike | None = None,
        max_attempts: int = 3,
        temperature: float = 0.8,
        max_new_tokens: int = 1024,
        device: str | int | None = None,
        dtype: str | None = None,
    ) -> None:
        super().__init__(instructions, max_attempts, temperature, max_new_tokens)
        if isinstance(model, (str, os.PathLike)):
            from transformers import pipeline

            self.model_id = str(model)
            model_kwargs = {"dtype": dtype} if dtype else {}
            self.pipeline = pipeline(
                "text-generation", model=self.model_id, device=device, trust_remote_code=False, **model_kwargs
            )
        else:
            self.pipeline = model
            self.model_id = getattr(getattr(model, "model", None), "name_or_path", type(model).__name__)
        self.name = f"transformers:{self.model_id}"

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "model": self.model_id}

    def _complete(self, messages: list[dict[str, str]], seed: int) -> str:
        import torch

        # Explicit in both cases: many instruct checkpoints turn sampling on in their generation config.
        sampling = (
            {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        )
        tokenizer = getattr(self.pipeline, "tokenizer", None)
        chat = getattr(tokenizer, "chat_template", None) is not None
        inputs: Any = messages if chat else messages[-1]["content"]
        # A seeded answer without touching the caller's random state (CPU, and CUDA when it is in use).
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            output = self.pipeline(inputs, max_new_tokens=self.max_new_tokens, return_full_text=False, **sampling)
        generated = output[0]["generated_text"]
        if isinstance(generated, list):  # chat output: the conversation, the assistant's turn last
            return str(generated[-1].get("content", "")) if generated else ""
        return str(generated)


class OpenAIPromptWriter(ChatPromptWriter):
    """Write pairs with a model behind an OpenAI-compatible chat-completions server (vLLM, TGI, Ollama, ...).

    Args:
        base_url: The server's API root, e.g. "http://localhost:8000/v1" (`/chat/completions` is appended).
        model: The model name the server serves.
        api_key_env: The environment variable holding the API key; no key is sent when it is unset.
        instructions: A Jinja file replacing the packaged instructions.
        max_attempts: Answers asked for per request when they are unusable.
        temperature: Sampling temperature.
        max_new_tokens: Sent as `max_tokens`.
        json_mode: Send `response_format={"type": "json_object"}`; turn off for servers that reject it.
        timeout: Seconds to wait for one answer.
        max_retries: Retries of a request that fails to connect, times out or gets HTTP 429/5xx.
        retry_backoff: Seconds before the first retry; doubled at each retry.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        instructions: str | os.PathLike | None = None,
        max_attempts: int = 3,
        temperature: float = 0.8,
        max_new_tokens: int = 1024,
        json_mode: bool = True,
        timeout: float = 120.0,
        max_retries: int = 3,
        retry_backoff: float = 2.0,
    ) -> None:
        super().__init__(instructions, max_attempts, temperature, max_new_tokens)
        for argument, value in (("max_retries", max_retries), ("retry_backoff", retry_backoff)):
            if value < 0:
                raise ValueError(f"{argument} must be >= 0, got {value}.")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}.")
        if not re.match(r"^https?://", base_url):
            raise ValueError(f"base_url={base_url!r} is not an http(s) URL; e.g. 'http://localhost:8000/v1'.")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.json_mode = json_mode
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.name = f"openai:{model}"

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "model": self.model, "json_mode": self.json_mode}

    def _complete(self, messages: list[dict[str, str]], seed: int) -> str:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_new_tokens,
            "seed": seed,
        }
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        response = self._post(body)
        try:
            return str(response["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            logger.warning("%s: answer without choices[0].message.content: %.200s", self.url, response)
            return ""

    def _post(self, body: dict[str, Any]) -> Any:
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(self.api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        data = json.dumps(body).encode()
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    text = reply.read().decode("utf-8", errors="replace")
            except urllib.error.HTTPError as error:
                detail = error.read().decode("utf-8", errors="replace")[:300]
                if error.code != 429 and error.code < 500:
                    raise PromptWriterError(
                        f"The LLM server at {self.url} refused the request (HTTP {error.code}: {detail}). "
                        f"Check the model name {self.model!r} and the API key in ${self.api_key_env}."
                    ) from error
                last_error = f"HTTP {error.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                last_error = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
            else:
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    # A proxy's error page or a wrong URL: retried like a server error, then a PromptWriterError.
                    # Never an empty answer, which would let a concept finish unwritten and keep a rerun from asking.
                    kind = "an HTML page" if text.lstrip()[:1] == "<" else "a reply that is not JSON"
                    last_error = f"{kind}: {text[:200]!r}; is the URL the OpenAI-compatible base, e.g. .../v1?"
            logger.warning("%s: attempt %d/%d failed (%s)", self.url, attempt + 1, self.max_retries + 1, last_error)
        raise PromptWriterError(
            f"The LLM server at {self.url} gave no usable answer in {self.max_retries + 1} attempts ({last_error}). "
            "Finished work is kept; start or fix the server and run the same command again to resume."
        )


def _load_json(text: str) -> Any:
    """The JSON value of an answer: a whole-text value, else the last top-level value found in a fence or in text.

    The last one wins because an answer follows any reasoning that may quote JSON before it.
    """
    fences = [block.strip() for block in re.findall(r"```(?:json)?\s*(.*?)```", text, flags=re.DOTALL)]
    for candidate in (*reversed(fences), text.strip()):
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            pass
        found = _last_json_value(candidate)
        if found is not None:
            return found
    return None


def _last_json_value(text: str) -> Any:
    decoder = json.JSONDecoder()
    found, position = None, 0
    while True:
        starts = [index for index in (text.find("{", position), text.find("[", position)) if index >= 0]
        if not starts:
            return found
        start = min(starts)
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            position = start + 1
            continue
        if isinstance(value, (dict, list)):
            found = value
        position = end


def _first_string(item: Any, keys: tuple[str, ...]) -> str | None:
    if not isinstance(item, dict):
        return None
    for key in keys:
        if isinstance(item.get(key), str):
            return item[key]
    return None
