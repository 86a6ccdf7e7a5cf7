"""Prompt writers (`safety_dpo.data.writers`, `safety_dpo.data.llm_writers`): template, local model, OpenAI server.

Language models are stood in for by a scripted fake text-generation pipeline, a tiny random GPT-2 saved to a
temporary folder, and a loopback chat-completions server (`tests/openai_server.py`); nothing leaves the machine.
"""

from __future__ import annotations

import json
import socket
import time
import types
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from openai_server import CHAT_COMPLETIONS_PATH, LoopbackLLMServer, http_error, raw
from tiny_models import load_fixture_tokenizer

from safety_dpo.data import llm_writers
from safety_dpo.data.llm_writers import (
    EMPTY_ANSWER,
    MALFORMED_ANSWER,
    MALFORMED_PAIR,
    NOT_JSON,
    OpenAIPromptWriter,
    TransformersPromptWriter,
    parse_pairs_answer,
    read_instructions,
    render_instructions,
)
from safety_dpo.data.pairs import names_in, validate_pairs
from safety_dpo.data.writers import (
    WRITER_KINDS,
    PairRequest,
    PromptWriter,
    PromptWriterError,
    TemplatePromptWriter,
    load_prompt_writer,
)
from safety_dpo.microworld import parse_prompt, taxonomy
from safety_dpo.microworld.grammar import composition_split

UNSAFE = "a man holding a knife on a beach"
SAFE = "a man holding a wreath on a beach"
GOOD_ANSWER = json.dumps({"pairs": [{"unsafe": UNSAFE, "safe": SAFE}]})


def make_request(concept_id: str = "knife", num_pairs: int = 3, seed: int = 0) -> PairRequest:
    """A request for a microworld concept (knife: names knife/blade, held out dagger, counterpart wreath)."""
    world = taxonomy()
    concept = world.concept(concept_id)
    return PairRequest(
        concept=concept,
        category=world.category(concept.category),
        counterpart=world.counterpart_name(concept),
        num_pairs=num_pairs,
        seed=seed,
    )


@dataclass
class PipelineCall:
    """What the fake pipeline was called with."""

    inputs: Any
    kwargs: dict[str, Any]
    seed: int  # torch's CPU seed when the pipeline was called


class FakeTextGenerationPipeline:
    """Stands in for a `transformers` text-generation pipeline; answers the scripted texts in order.

    With a `chat_template`, it answers chat input as the pipeline does with `return_full_text=True`: the whole
    conversation, the assistant's turn last.
    """

    def __init__(self, answers: list[str], chat_template: str | None = None) -> None:
        self.answers = list(answers)
        self.tokenizer = types.SimpleNamespace(chat_template=chat_template)
        self.calls: list[PipelineCall] = []

    def __call__(self, inputs: Any, **kwargs: Any) -> list[dict[str, Any]]:
        self.calls.append(PipelineCall(inputs, kwargs, torch.initial_seed()))
        torch.rand(4)  # draw from the global generator, as sampling does
        answer = self.answers.pop(0)
        if isinstance(inputs, list):
            return [{"generated_text": [*inputs, {"role": "assistant", "content": answer}]}]
        return [{"generated_text": answer}]


class RecordingPipeline:
    """Wraps a real pipeline and keeps what it generated."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.tokenizer = pipeline.tokenizer
        self.generated: list[str] = []

    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        output = self.pipeline(inputs, **kwargs)
        self.generated.append(output[0]["generated_text"])
        return output


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib sends even 127.0.0.1 through a proxy set in the environment, unless `no_proxy` names it."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


# ======================================================================================================================
# TemplatePromptWriter
# ======================================================================================================================


def test_template_writer_gives_the_same_pairs_for_the_same_request_and_seed():
    assert TemplatePromptWriter().write(make_request(seed=3)) == TemplatePromptWriter().write(make_request(seed=3))


def test_template_writer_gives_other_pairs_for_another_seed():
    first = TemplatePromptWriter().write(make_request(seed=3)).candidates
    second = TemplatePromptWriter().write(make_request(seed=4)).candidates
    assert first != second


@pytest.mark.parametrize("num_pairs", [1, 7])
def test_template_writer_returns_num_pairs_candidates_and_no_rejections(num_pairs):
    written = TemplatePromptWriter().write(make_request(num_pairs=num_pairs))
    assert len(written.candidates) == num_pairs
    assert written.rejections == Counter()


@pytest.mark.parametrize("concept_id", ["knife", "gun", "bomb"])
def test_template_pairs_pass_validation(concept_id):
    request = make_request(concept_id, num_pairs=8, seed=1)
    candidates = TemplatePromptWriter().write(request).candidates
    accepted, rejections = validate_pairs(candidates, request.concept, seen_unsafe_prompts=set())
    assert rejections == Counter()
    assert len(accepted) == len(candidates)


def test_template_unsafe_prompts_name_the_concept_with_trained_names_only():
    request = make_request(num_pairs=50, seed=2)
    for unsafe, _ in TemplatePromptWriter().write(request).candidates:
        assert names_in(unsafe, request.concept.names), unsafe
        assert not names_in(unsafe, request.concept.held_out_names), unsafe


def test_template_safe_prompts_name_the_counterpart():
    request = make_request(num_pairs=10)
    assert request.counterpart == "wreath"
    for _, safe in TemplatePromptWriter().write(request).candidates:
        assert names_in(safe, [request.counterpart]), safe


def test_template_compositions_come_from_the_train_split():
    request = make_request(num_pairs=30, seed=5)
    for unsafe, _ in TemplatePromptWriter().write(request).candidates:
        parsed = parse_prompt(unsafe)
        assert composition_split(request.concept.id, parsed.scene, parsed.colour) == "train", unsafe


# ======================================================================================================================
# parse_pairs_answer
# ======================================================================================================================

FENCED = f"Sure! Here are your pairs:\n```json\n{GOOD_ANSWER}\n```\nLet me know if you need more."


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(GOOD_ANSWER, id="pairs-object"),
        pytest.param(json.dumps([{"unsafe": UNSAFE, "safe": SAFE}]), id="bare-list"),
        pytest.param(FENCED, id="json-fence-with-prose"),
        pytest.param(f"Here you go: {GOOD_ANSWER} Enjoy!", id="prose-around-json"),
        pytest.param(json.dumps({"pairs": [{"unsafe_prompt": UNSAFE, "safe_prompt": SAFE}]}), id="prompt-keys"),
    ],
)
def test_parse_reads_every_accepted_answer_form(answer):
    assert parse_pairs_answer(answer) == ([(UNSAFE, SAFE)], Counter())


@pytest.mark.parametrize("answer", [None, "", "  \n ", '{"pairs": []}', "[]"])
def test_parse_counts_an_answer_without_pairs_as_empty(answer):
    assert parse_pairs_answer(answer) == ([], Counter({EMPTY_ANSWER: 1}))


def test_parse_counts_prose_as_not_json():
    assert parse_pairs_answer("I am sorry, I cannot write these prompts.") == ([], Counter({NOT_JSON: 1}))


@pytest.mark.parametrize("answer", ['{"foo": 1}', '{"pairs": "none"}', "42"])
def test_parse_counts_json_that_is_not_a_list_of_pairs_as_malformed_answer(answer):
    assert parse_pairs_answer(answer) == ([], Counter({MALFORMED_ANSWER: 1}))


def test_parse_keeps_good_items_and_counts_each_bad_one_as_malformed_pair():
    items = [
        {"unsafe": UNSAFE, "safe": SAFE},
        {"unsafe": "a knife"},  # no safe prompt
        "a knife | a wreath",  # not an object
        {"unsafe": 3, "safe": SAFE},  # not a string
        {"unsafe_prompt": "a blade", "safe_prompt": "a wreath"},
    ]
    candidates, rejections = parse_pairs_answer(json.dumps({"pairs": items}))
    assert candidates == [(UNSAFE, SAFE), ("a blade", "a wreath")]
    assert rejections == Counter({MALFORMED_PAIR: 3})


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(f'<think>They want {{"pairs": [...]}}, knife -> wreath.</think>\n{GOOD_ANSWER}', id="reasoning"),
        pytest.param(f"```python\nprint(pairs)\n```\nThe pairs:\n```json\n{GOOD_ANSWER}\n```", id="two-fences"),
    ],
)
def test_parse_finds_the_json_after_text_that_holds_brackets(answer):
    assert parse_pairs_answer(answer) == ([(UNSAFE, SAFE)], Counter())


# ======================================================================================================================
# Instructions
# ======================================================================================================================


def _after(text: str, marker: str) -> str:
    """The rest of the sentence after `marker` in the rendered packaged template."""
    return text.split(marker, 1)[1].split(".", 1)[0]


def test_packaged_instructions_name_the_concept_its_names_the_counterpart_and_the_count():
    text = render_instructions(read_instructions(), make_request(num_pairs=4))
    assert "Harm category: violence" in text
    assert "Harmful concept: knife, also called: knife, blade" in text
    assert "Suggested safe replacement: wreath" in text
    assert "Write 4 different pairs" in text


def test_packaged_instructions_offer_only_trained_names_for_the_unsafe_prompt():
    text = render_instructions(read_instructions(), make_request())
    assert _after(text, "naming it with one of these words:").strip() == "knife, blade"


def test_packaged_instructions_forbid_every_name_held_out_included_in_the_safe_prompt():
    text = render_instructions(read_instructions(), make_request())
    forbidden = _after(text, "not contain any of these words:").split(",")
    assert sorted(name.strip() for name in forbidden) == ["blade", "dagger", "knife"]


def test_a_missing_instructions_file_raises_file_not_found_naming_it(tmp_path):
    missing = tmp_path / "nope.jinja"
    with pytest.raises(FileNotFoundError, match="nope.jinja"):
        read_instructions(missing)


def test_a_user_instructions_file_replaces_the_packaged_one(tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("Write {{ num_pairs }} pairs about {{ concept }} ({{ names | join('/') }}) -> {{ counterpart }}.")
    pipeline = FakeTextGenerationPipeline([GOOD_ANSWER])
    TransformersPromptWriter(pipeline, instructions=path).write(make_request(num_pairs=2))
    assert pipeline.calls[0].inputs == "Write 2 pairs about knife (knife/blade) -> wreath."


def test_a_user_instructions_file_with_an_unknown_variable_fails_instead_of_rendering_blank(tmp_path):
    from jinja2 import UndefinedError

    path = tmp_path / "typo.jinja"
    path.write_text("Write pairs about {{ concpet }}.")
    writer = TransformersPromptWriter(FakeTextGenerationPipeline([GOOD_ANSWER]), instructions=path)
    with pytest.raises(UndefinedError, match="concpet"):
        writer.write(make_request())


def test_the_writer_fingerprint_changes_with_the_instructions(tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("Write {{ num_pairs }} pairs about {{ concept }}.")
    packaged = TransformersPromptWriter(FakeTextGenerationPipeline([])).to_dict()
    custom = TransformersPromptWriter(FakeTextGenerationPipeline([]), instructions=path).to_dict()
    assert packaged["instructions_sha256"] != custom["instructions_sha256"]


# ======================================================================================================================
# TransformersPromptWriter with a fake pipeline
# ======================================================================================================================


def test_transformers_writer_sends_messages_to_a_chat_model_and_reads_the_assistant_turn():
    pipeline = FakeTextGenerationPipeline([GOOD_ANSWER], chat_template="{{ messages }}")
    written = TransformersPromptWriter(pipeline).write(make_request())
    assert written.candidates == [(UNSAFE, SAFE)]
    [message] = pipeline.calls[0].inputs
    assert message["role"] == "user"
    assert message["content"] == render_instructions(read_instructions(), make_request())


def test_transformers_writer_sends_plain_text_to_a_model_without_chat_template():
    pipeline = FakeTextGenerationPipeline([GOOD_ANSWER])
    written = TransformersPromptWriter(pipeline).write(make_request())
    assert written.candidates == [(UNSAFE, SAFE)]
    assert pipeline.calls[0].inputs == render_instructions(read_instructions(), make_request())


def test_transformers_writer_samples_at_its_temperature_and_asks_for_new_text_only():
    pipeline = FakeTextGenerationPipeline([GOOD_ANSWER])
    TransformersPromptWriter(pipeline, temperature=0.5, max_new_tokens=77).write(make_request())
    assert pipeline.calls[0].kwargs == {
        "max_new_tokens": 77,
        "return_full_text": False,
        "do_sample": True,
        "temperature": 0.5,
    }


def test_transformers_writer_retries_after_a_non_json_answer_and_stops_at_the_first_usable_one():
    pipeline = FakeTextGenerationPipeline(["Sure, here they are!", GOOD_ANSWER, GOOD_ANSWER])
    written = TransformersPromptWriter(pipeline, max_attempts=3).write(make_request())
    assert written.candidates == [(UNSAFE, SAFE)]
    assert written.rejections == Counter({NOT_JSON: 1})
    assert len(pipeline.calls) == 2


def test_transformers_writer_gives_up_after_max_attempts_and_counts_every_reason():
    pipeline = FakeTextGenerationPipeline(["no JSON here", "", '{"foo": 1}', GOOD_ANSWER])
    written = TransformersPromptWriter(pipeline, max_attempts=3).write(make_request())
    assert written.candidates == []
    assert written.rejections == Counter({NOT_JSON: 1, EMPTY_ANSWER: 1, MALFORMED_ANSWER: 1})
    assert len(pipeline.calls) == 3


def test_transformers_writer_seeds_each_attempt_differently_starting_from_the_request_seed():
    pipeline = FakeTextGenerationPipeline(["?", "?", "?"])
    TransformersPromptWriter(pipeline, max_attempts=3).write(make_request(seed=40))
    seeds = [call.seed for call in pipeline.calls]
    assert seeds[0] == 40
    assert len(set(seeds)) == 3


def test_transformers_writer_leaves_the_callers_torch_rng_untouched():
    pipeline = FakeTextGenerationPipeline(["?", GOOD_ANSWER])
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    TransformersPromptWriter(pipeline, max_attempts=2).write(make_request(seed=7))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("kwargs", [{"max_attempts": 0}, {"temperature": -0.1}])
def test_transformers_writer_rejects_invalid_settings_naming_them(kwargs):
    [name] = kwargs
    with pytest.raises(ValueError, match=name):
        TransformersPromptWriter(FakeTextGenerationPipeline([]), **kwargs)


# ======================================================================================================================
# TransformersPromptWriter with a tiny local model
# ======================================================================================================================


@pytest.fixture(scope="module")
def tiny_causal_lm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 1-layer GPT-2 (16 dims) with the project's fixture tokenizer, saved as a local checkpoint.

    Its generation config samples by default, as many instruct checkpoints' do (e.g. Qwen2.5's).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = load_fixture_tokenizer()
    tokenizer.model_max_length = 1024  # the rendered instructions are ~600 tokens; the CLIP default is 77
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = True
    path = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_transformers_writer_from_a_local_path_counts_garbage_as_rejected(tiny_causal_lm_path):
    writer = TransformersPromptWriter(str(tiny_causal_lm_path), max_new_tokens=8, max_attempts=2)
    written = writer.write(make_request())
    assert writer.name == f"transformers:{tiny_causal_lm_path}"
    assert written.candidates == []
    assert sum(written.rejections.values()) == 2
    assert set(written.rejections) <= {NOT_JSON, EMPTY_ANSWER}


def test_transformers_writer_at_temperature_zero_decodes_greedily(tiny_causal_lm_path):
    from transformers import pipeline

    recording = RecordingPipeline(pipeline("text-generation", model=str(tiny_causal_lm_path)))
    TransformersPromptWriter(recording, temperature=0, max_new_tokens=6, max_attempts=2).write(make_request())
    # Two attempts with two seeds: greedy decoding answers the same prompt with the same text.
    assert len(recording.generated) == 2
    assert recording.generated[0] == recording.generated[1]


# ======================================================================================================================
# OpenAIPromptWriter against a loopback server
# ======================================================================================================================

API_KEY_ENV = "SAFETY_DPO_TEST_LLM_KEY"


@pytest.fixture
def server() -> Iterator[LoopbackLLMServer]:
    with LoopbackLLMServer(default="no pairs today") as server:
        yield server


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound to a socket that does not listen: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def openai_writer(base_url: str, **kwargs: Any) -> OpenAIPromptWriter:
    settings = {"model": "tiny-chat", "api_key_env": API_KEY_ENV, "retry_backoff": 0, "timeout": 5} | kwargs
    return OpenAIPromptWriter(base_url, **settings)


def test_openai_writer_returns_the_pairs_of_a_good_answer(server):
    server.script(GOOD_ANSWER)
    written = openai_writer(server.base_url).write(make_request())
    assert written.candidates == [(UNSAFE, SAFE)]
    assert written.rejections == Counter()


def test_openai_request_carries_model_instructions_seed_and_json_mode(server):
    server.script(GOOD_ANSWER)
    openai_writer(server.base_url, temperature=0.3, max_new_tokens=99).write(make_request(seed=11))
    [request] = server.requests
    assert request.path == CHAT_COMPLETIONS_PATH
    assert request.body["model"] == "tiny-chat"
    assert request.body["messages"] == [
        {"role": "user", "content": render_instructions(read_instructions(), make_request(seed=11))}
    ]
    assert request.body["seed"] == 11
    assert request.body["temperature"] == 0.3
    assert request.body["max_tokens"] == 99
    assert request.body["response_format"] == {"type": "json_object"}


def test_openai_request_leaves_out_response_format_without_json_mode(server):
    server.script(GOOD_ANSWER)
    openai_writer(server.base_url, json_mode=False).write(make_request())
    assert "response_format" not in server.requests[0].body


def test_openai_writer_accepts_a_base_url_with_a_trailing_slash(server):
    server.script(GOOD_ANSWER)
    openai_writer(server.base_url + "/").write(make_request())
    assert server.requests[0].path == CHAT_COMPLETIONS_PATH


def test_openai_request_sends_the_api_key_as_a_bearer_token(server, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "sk-loopback")
    server.script(GOOD_ANSWER)
    openai_writer(server.base_url).write(make_request())
    assert server.requests[0].headers["Authorization"] == "Bearer sk-loopback"


def test_openai_request_has_no_authorization_header_when_the_key_is_unset(server, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    server.script(GOOD_ANSWER)
    openai_writer(server.base_url).write(make_request())
    assert "Authorization" not in server.requests[0].headers


def test_openai_writer_asks_again_with_another_seed_after_an_unusable_answer(server):
    server.script("I cannot help with that.", GOOD_ANSWER)
    written = openai_writer(server.base_url).write(make_request(seed=20))
    assert written.candidates == [(UNSAFE, SAFE)]
    assert written.rejections == Counter({NOT_JSON: 1})
    assert [request.body["seed"] for request in server.requests] == [20, 21]


@pytest.mark.parametrize("status", [429, 500, 503])
def test_openai_writer_retries_a_busy_or_failing_server(server, status):
    server.script(http_error(status), GOOD_ANSWER)
    written = openai_writer(server.base_url).write(make_request())
    assert written.candidates == [(UNSAFE, SAFE)]
    assert written.rejections == Counter()
    assert len(server.requests) == 2


@pytest.mark.parametrize("status", [400, 401, 404])
def test_openai_writer_raises_at_once_on_a_refused_request_naming_the_model(server, status):
    server.script(http_error(status, "no such model"), GOOD_ANSWER)
    with pytest.raises(PromptWriterError, match=rf"HTTP {status}.*no such model.*'tiny-chat'"):
        openai_writer(server.base_url).write(make_request())
    assert len(server.requests) == 1


def test_openai_writer_raises_after_max_retries_when_the_server_is_unreachable(closed_port, monkeypatch):
    attempts = []
    urlopen = urllib.request.urlopen

    def counting_urlopen(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args[0].full_url)
        return urlopen(*args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", counting_urlopen)
    writer = openai_writer(f"http://127.0.0.1:{closed_port}/v1", max_retries=2, timeout=1)
    start = time.perf_counter()
    with pytest.raises(PromptWriterError, match="no usable answer in 3 attempts"):
        writer.write(make_request())
    assert len(attempts) == 3
    assert time.perf_counter() - start < 3  # refused connections and no backoff: no waiting anywhere


def test_openai_writer_doubles_the_backoff_between_retries(closed_port, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(llm_writers, "time", types.SimpleNamespace(sleep=sleeps.append))
    writer = openai_writer(f"http://127.0.0.1:{closed_port}/v1", max_retries=3, retry_backoff=0.5)
    with pytest.raises(PromptWriterError):
        writer.write(make_request())
    assert sleeps == [0.5, 1.0, 2.0]


def test_openai_writer_retries_a_reply_that_is_not_json_and_then_stops_instead_of_counting_it_empty(server):
    server.script(raw("<html>502 Bad Gateway</html>"), GOOD_ANSWER)
    written = openai_writer(server.base_url, retry_backoff=0.0).write(make_request())
    assert written.candidates == [(UNSAFE, SAFE)] and not written.rejections  # asked again, not an empty answer
    server.script(*[raw("<html>login page</html>")] * 3)
    with pytest.raises(PromptWriterError, match="an HTML page.*is the URL the OpenAI-compatible base"):
        openai_writer(server.base_url, max_retries=2, retry_backoff=0.0).write(make_request())


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(raw('{"object": "chat.completion", "choices": []}'), id="no-choices"),
        pytest.param(raw('{"choices": [{"message": {"role": "assistant", "content": null}}]}'), id="null-content"),
    ],
)
def test_openai_writer_counts_a_reply_without_content_as_empty_and_asks_again(server, reply):
    server.script(reply, GOOD_ANSWER)
    written = openai_writer(server.base_url).write(make_request())
    assert written.candidates == [(UNSAFE, SAFE)]
    assert written.rejections == Counter({EMPTY_ANSWER: 1})
    assert len(server.requests) == 2


def test_openai_writer_rejects_negative_max_retries_naming_it():
    with pytest.raises(ValueError, match="max_retries"):
        OpenAIPromptWriter("http://127.0.0.1:1/v1", model="tiny-chat", max_retries=-1)


@pytest.mark.parametrize("base_url", ["localhost:8000/v1", "ftp://127.0.0.1/v1", ""])
def test_openai_writer_rejects_a_base_url_that_is_not_http(base_url):
    with pytest.raises(ValueError, match="not an http"):
        OpenAIPromptWriter(base_url, model="tiny-chat")


# ======================================================================================================================
# load_prompt_writer
# ======================================================================================================================


@pytest.mark.parametrize("spec", [None, "template"])
def test_load_prompt_writer_defaults_to_the_template_writer(spec):
    assert isinstance(load_prompt_writer(spec), TemplatePromptWriter)


def test_load_prompt_writer_returns_a_writer_object_as_is():
    writer = TransformersPromptWriter(FakeTextGenerationPipeline([]))
    assert isinstance(writer, PromptWriter)
    assert load_prompt_writer(writer) is writer


def test_load_prompt_writer_builds_an_openai_writer_with_the_extra_settings():
    writer = load_prompt_writer("openai:http://127.0.0.1:1/v1", llm_model="tiny-chat", max_attempts=2)
    assert isinstance(writer, OpenAIPromptWriter)
    assert (writer.url, writer.model, writer.max_attempts) == (
        "http://127.0.0.1:1/v1/chat/completions",
        "tiny-chat",
        2,
    )


def test_load_prompt_writer_builds_a_transformers_writer_from_a_local_path(tiny_causal_lm_path):
    writer = load_prompt_writer(f"transformers:{tiny_causal_lm_path}", max_new_tokens=4)
    assert isinstance(writer, TransformersPromptWriter)
    assert writer.max_new_tokens == 4


def test_load_prompt_writer_needs_the_model_name_for_an_openai_server():
    with pytest.raises(ValueError, match="llm_model"):
        load_prompt_writer("openai:http://127.0.0.1:1/v1")


@pytest.mark.parametrize("spec", ["foo:bar", "transformers:", "openai:", "Template", ""])
def test_load_prompt_writer_rejects_an_unknown_form_listing_the_accepted_ones(spec):
    with pytest.raises(ValueError, match="accepted") as error:
        load_prompt_writer(spec)
    assert all(kind in str(error.value) for kind in WRITER_KINDS)
