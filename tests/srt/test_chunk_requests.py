"""Chunk marking end to end on a real server: cb.chunk + sgl.gen, /generate, OpenAI chat.

Uses the session ``server`` (``--enable-cacheblend``). Chunk-index counters are compared as
deltas, and every test uses passages of its own, so the tests do not depend on each other's
order (the last one checks the pool once the server is idle).
"""

from __future__ import annotations

import concurrent.futures
import json
import time
import uuid

import pytest
import requests

import sglang_cacheblend as cb
from sglang_cacheblend.chunks import (
    CHUNK_CLOSE,
    CHUNK_OPEN,
    chunk_hints,
    precompute_hints,
    split_chunks,
    tokenize_segments,
)

TIMEOUT = 300
GREEDY = {"temperature": 0, "max_new_tokens": 8}


def _passages(n: int) -> list[str]:
    """``n`` passages no other test sends (a fresh tag in each)."""
    tag = uuid.uuid4().hex[:8]
    facts = [
        "The Eiffel Tower is in Paris, the capital of France.",
        "Mount Fuji is the highest mountain in Japan.",
        "The Amazon river flows through Brazil and Peru.",
        "Penguins live mostly in the Southern Hemisphere.",
        "The piano was invented in Italy around 1700.",
    ]
    return [f"[doc {tag}-{i}] {facts[i % len(facts)]}" for i in range(n)]


def _state(server) -> dict:
    info = requests.get(server.base_url + "/server_info", timeout=60).json()
    return info["internal_states"][0]["cacheblend"]


def _stats_delta(before: dict, after: dict) -> dict:
    keys = ("hits", "misses", "hit_tokens", "inserts", "duplicate_inserts")
    return {key: after["chunk_index"][key] - before["chunk_index"][key] for key in keys}


def _post(server, path: str, body: dict) -> requests.Response:
    return requests.post(server.base_url + path, json=body, timeout=TIMEOUT)


def _generate(server, body: dict) -> dict:
    response = _post(server, "/generate", {"sampling_params": GREEDY, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _chat(server, messages: list[dict]) -> dict:
    body = {
        "model": "default",
        "messages": messages,
        "max_tokens": GREEDY["max_new_tokens"],
        "temperature": 0,
        "return_prompt_token_ids": True,
    }
    response = _post(server, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def _normalized_request(**fields):
    from sglang.srt.managers.io_struct import GenerateReqInput

    obj = GenerateReqInput(sampling_params={"max_new_tokens": 3}, **fields)
    obj.normalize_batch_and_arguments()
    return obj


def _run_tokenizer_hook(manager, obj):
    """The tokenizer hook around a stand-in for SGLang's tokenization (which keeps the ids)."""
    import asyncio
    from types import SimpleNamespace

    from sglang_cacheblend.srt.tokenizer_hooks import tokenize_with_chunks

    async def original(_manager, request):
        return SimpleNamespace(input_ids=list(request.input_ids), kv_hints=request.kv_hints,
                               extra_key=request.extra_key)

    return asyncio.run(tokenize_with_chunks(original, manager, obj))


def test_tokenizer_hook_writes_the_request_and_keeps_other_kv_hints(tokenizer, monkeypatch):
    from types import SimpleNamespace

    from sglang_cacheblend.options import ENV_VAR, ServerOptions
    from sglang_cacheblend.srt.layout_envelope import SERVER_ACTION, layout_of

    # Chunks this short are below the server's default minimum: allow them here; standalone
    # chunk KV (no chunk context), so a precompute is the sink and the chunk.
    monkeypatch.setenv(ENV_VAR, ServerOptions(enabled=True, min_chunk_tokens=1,
                                              chunk_context="").to_env())
    manager = SimpleNamespace(tokenizer=tokenizer, context_len=8192,
                              model_config=SimpleNamespace(num_hidden_layers=30))
    plain = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    other = {"action_id": "x", "action_type": "other.hint", "action_version": "3", "payload": {}}
    hints = {"protocol_version": "1", "message_id": "m", "actions": [other]}
    obj = _normalized_request(text="Q " + cb.chunk("alpha beta") + " end", kv_hints=hints)
    tokenized = _run_tokenizer_hook(manager, obj)
    assert obj.input_ids == plain("Q ") + plain("alpha beta") + plain(" end")
    assert obj.text == "Q alpha beta end"
    assert [a.action_type for a in tokenized.kv_hints.actions] == ["other.hint", SERVER_ACTION]
    req = SimpleNamespace(kv_hints=tokenized.kv_hints, origin_input_ids=obj.input_ids, rid="r")
    start = len(plain("Q "))
    request = layout_of(req)
    assert request.spans == ((start, start + len(plain("alpha beta"))),)
    assert request.fits_prompt(obj.input_ids)  # bound to the final ids (issue 25 G1)
    assert not request.fits_prompt(obj.input_ids[:-1])
    assert request.sink == (tokenizer.bos_token_id,) and request.blend is not None
    assert tokenized.extra_key.startswith("cacheblend:v1:")

    ids = plain("a passage given as token ids")
    obj = _normalized_request(input_ids=list(ids), kv_hints=precompute_hints())
    tokenized = _run_tokenizer_hook(manager, obj)
    assert obj.input_ids == [tokenizer.bos_token_id, *ids]  # the sink, then the chunk
    request = layout_of(SimpleNamespace(kv_hints=tokenized.kv_hints, rid="p"))
    assert request.precompute and request.spans == ((1, 1 + len(ids)),)
    assert request.blend is None


def test_tokenizer_hook_puts_the_chunk_context_before_precomputed_chunks(tokenizer, monkeypatch):
    from types import SimpleNamespace

    from sglang_cacheblend.options import ENV_VAR, ServerOptions
    from sglang_cacheblend.srt.layout_envelope import layout_of

    text = "Some preceding text for every chunk.\n\n"
    monkeypatch.setenv(ENV_VAR, ServerOptions(enabled=True, min_chunk_tokens=1,
                                              chunk_context=text).to_env())
    manager = SimpleNamespace(tokenizer=tokenizer, context_len=8192,
                              model_config=SimpleNamespace(num_hidden_layers=30))
    plain = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    ids, context = plain("a passage given as token ids"), plain(text)
    requests_of = {}
    for choice in (None, "none"):
        obj = _normalized_request(input_ids=list(ids),
                                  kv_hints=precompute_hints(chunk_context=choice))
        tokenized = _run_tokenizer_hook(manager, obj)
        request = layout_of(SimpleNamespace(kv_hints=tokenized.kv_hints, rid="p"))
        prefix = [tokenizer.bos_token_id, *(context if choice is None else [])]
        assert obj.input_ids == [*prefix, *ids]
        assert request.spans == ((len(prefix), len(prefix) + len(ids)),)
        assert request.prefix_ids == tuple(prefix)
        requests_of[choice] = request
    assert requests_of[None].context == tuple(context) and not requests_of["none"].context
    assert "+context:" in requests_of[None].variant
    assert requests_of["none"].variant == f"standalone-after:{tokenizer.bos_token_id}"
    # Blended requests on the two kinds of chunk KV never share a blended prefix.
    keys = set()
    for choice in (None, "none"):
        obj = _normalized_request(input_ids=[*ids, *ids], kv_hints=chunk_hints(
            [(0, len(ids))], chunk_context=choice))
        keys.add(_run_tokenizer_hook(manager, obj).extra_key)
    assert len(keys) == 2


def test_tokenizer_hook_is_inert_without_enable_cacheblend(tokenizer, monkeypatch):
    from types import SimpleNamespace

    from sglang_cacheblend.options import ENV_VAR

    monkeypatch.delenv(ENV_VAR, raising=False)
    manager = SimpleNamespace(tokenizer=tokenizer, context_len=8192,
                              model_config=SimpleNamespace(num_hidden_layers=30))
    text = "Q " + cb.chunk("alpha beta") + " end"
    obj = _normalized_request(text=text, input_ids=[5, 6, 7], kv_hints=chunk_hints([(0, 2)]))
    tokenized = _run_tokenizer_hook(manager, obj)
    assert obj.text == text and obj.input_ids == [5, 6, 7]  # untouched
    assert [a.action_type for a in tokenized.kv_hints.actions] == ["cacheblend.chunks"]


# ------------------------------------------------------------------------------ errors


def _bad_requests() -> list[tuple[str, dict, str]]:
    long_chunk = cb.chunk("word " * 9000)  # more tokens than the model's context
    hints = lambda spans: chunk_hints(spans)  # noqa: E731
    ids = list(range(10, 30))
    return [
        ("/generate", {"text": f"a {CHUNK_OPEN} b"}, "never closed"),
        ("/generate", {"text": f"a {CHUNK_CLOSE} b"}, "no matching start marker"),
        ("/generate", {"text": f"{CHUNK_OPEN}x{cb.chunk('y')}{CHUNK_CLOSE}"}, "cannot nest"),
        (
            "/generate",
            {"text": f"q {CHUNK_OPEN} {CHUNK_CLOSE}"},
            "chunk 0 (at character 2) is empty",
        ),
        ("/generate", {"text": long_chunk}, "more than the limit of"),
        ("/generate", {"input_ids": ids, "kv_hints": hints([(5, 30)])}, "outside the prompt of 20"),
        ("/generate", {"input_ids": ids, "kv_hints": hints([(0, 6), (5, 9)])}, "must not overlap"),
        ("/generate", {"input_ids": ids, "kv_hints": hints([(8, 9), (0, 2)])}, "sorted"),
        ("/generate", {"input_ids": ids, "kv_hints": hints([(4, 4)])}, "is empty"),
        ("/generate", {"text": "too short", "kv_hints": hints([(0, 50)])}, "outside the prompt"),
        (
            "/generate",
            {"text": cb.chunk("x") + " more", "kv_hints": hints([(0, 1)])},
            "not both",
        ),
        (
            "/generate",
            {"text": cb.chunk("x") + cb.chunk("y"), "kv_hints": precompute_hints()},
            "exactly one chunk",
        ),
        (
            "/v1/chat/completions",
            {"model": "default", "messages": [{"role": "user", "content": f"a {CHUNK_OPEN}"}]},
            "messages[0]: chunk start marker at character 2 is never closed",
        ),
    ]


def test_bad_markers_and_spans_get_400_naming_the_problem_and_the_server_keeps_serving(server):
    for path, body, message in _bad_requests():
        response = _post(server, path, {"sampling_params": {"max_new_tokens": 2}, **body})
        assert response.status_code == 400, (body, response.text)
        assert message in response.text, (message, response.text)
    ok = _generate(server, {"text": "Hello " + cb.chunk(_passages(1)[0]) + " Summary:"})
    assert ok["meta_info"]["completion_tokens"] > 0
    pool = _state(server)["token_pool"]
    assert pool["available"] + pool["evictable"] + pool["protected"] == pool["total"]


# ------------------------------------------------------------------------------ three ways


def test_frontend_generate_and_openai_give_the_same_tokens_and_answer(standalone_server,
                                                                        tokenizer):
    """On ``standalone_server``: the chunk-index counts are of the chunks alone (the shipped
    chunk context's own entry is a miss of whichever request computes it first)."""
    import sglang as sgl

    server = standalone_server

    a, b, c = _passages(3)
    content = f"Passages:\n{cb.chunk(a)}\n{cb.chunk(b)}\n{cb.chunk(c)}\nWhere is the Eiffel Tower?"
    messages = [{"role": "user", "content": content}]
    # The chat template with the markers in place; each chunk is then tokenized on its own.
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    plain = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    expected = tokenize_segments(split_chunks(rendered), plain)
    assert len(expected.spans) == 3
    for (start, end), passage in zip(expected.spans, (a, b, c)):
        assert list(expected.input_ids[start:end]) == plain(passage)

    before = _state(server)
    chat = _chat(server, messages)
    text = _generate(server, {"text": rendered, "return_prompt_token_ids": True})
    spans = _generate(
        server,
        {
            "input_ids": list(expected.input_ids),
            "kv_hints": chunk_hints(expected.spans),
            "return_prompt_token_ids": True,
        },
    )

    @sgl.function
    def rag(s, pieces):
        for piece in pieces:
            s += cb.chunk(piece.text) if piece.is_chunk else piece.text
        s += sgl.gen("answer", max_tokens=GREEDY["max_new_tokens"], temperature=0)

    state = rag.run(pieces=split_chunks(rendered), backend=sgl.RuntimeEndpoint(server.base_url))
    after = _state(server)

    assert chat["choices"][0]["prompt_token_ids"] == list(expected.input_ids)
    assert text["prompt_token_ids"] == spans["prompt_token_ids"] == list(expected.input_ids)
    assert state.get_meta_info("answer")["prompt_tokens"] == len(expected.input_ids)
    answers = {
        chat["choices"][0]["message"]["content"].strip(),
        text["text"].strip(),
        spans["text"].strip(),
        state["answer"].strip(),
    }
    assert len(answers) == 1, answers
    # Unseen chunks are misses of the first request; the three repeats are exact prefix hits,
    # whose chunk spans the prefix covers, so they are not looked up again.
    assert _stats_delta(before, after) == {
        "hits": 0,
        "misses": 3,
        "hit_tokens": 0,
        "inserts": 0,
        "duplicate_inserts": 0,
    }


# ------------------------------------------------------------------------------ precompute


def test_precomputed_chunks_are_found_in_any_order_and_position(standalone_server, tokenizer):
    """On ``standalone_server``: each precompute's prompt is the sink and the chunk alone."""
    server = standalone_server
    a, b, c, d, e = _passages(5)
    plain = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    before = _state(server)
    outputs = cb.precompute_chunks(server.base_url, [a, b, c])
    # Each chunk ran standalone after a one-token attention sink (SmolLM2's BOS).
    assert [o["meta_info"]["prompt_tokens"] for o in outputs] == [
        1 + len(plain(p)) for p in (a, b, c)
    ]
    stored = _state(server)
    assert _stats_delta(before, stored)["inserts"] == 3
    assert stored["token_pool"]["protected"] == 0

    question = f"Question {uuid.uuid4().hex[:6]}: where is the Eiffel Tower?\n"
    reordered = question + cb.chunk(c) + "\n\n" + cb.chunk(a) + " " + cb.chunk(b) + "\nAnswer:"
    _generate(server, {"text": reordered})
    found = _state(server)
    assert _stats_delta(stored, found) == {
        "hits": 3,
        "misses": 0,
        "hit_tokens": sum(len(plain(p)) for p in (a, b, c)),
        "inserts": 0,
        "duplicate_inserts": 0,
    }

    _generate(server, {"text": "Other question.\n" + cb.chunk(b) + cb.chunk(d) + "\nAnswer:"})
    mixed = _state(server)
    assert _stats_delta(found, mixed)["hits"] == 1
    assert _stats_delta(found, mixed)["misses"] == 1

    # A chunk-only request with max_new_tokens 0 precomputes too; a repeat is a duplicate.
    _generate(server, {"text": cb.chunk(e), "sampling_params": {"max_new_tokens": 0}})
    cb.precompute_chunks(server.base_url, [a])
    again = _state(server)
    assert _stats_delta(mixed, again)["inserts"] == 1
    assert _stats_delta(mixed, again)["duplicate_inserts"] == 1

    chat = [{"role": "user", "content": f"{cb.chunk(e)}\n{cb.chunk(a)}\nWhich animal is named?"}]
    _chat(server, chat)
    assert _stats_delta(again, _state(server))["hits"] == 2


# ------------------------------------------------------------------------------ no leaks


def test_chunk_hits_are_released_once_the_blend_ran_and_nothing_is_held_after_abort(server):
    """Review F6: a blended request's hits stayed locked through its whole decode, although its
    own slots already held their KV (the lock window itself is pinned in test_admission.py)."""
    passage = " ".join(_passages(12))  # one chunk of ~300 tokens: enough to blend
    cb.precompute_chunks(server.base_url, [passage])
    rid = uuid.uuid4().hex
    body = {
        "rid": rid,
        "text": "Repeat forever: " + cb.chunk(passage),
        "sampling_params": {"temperature": 0, "max_new_tokens": 2000, "ignore_eos": True},
    }
    blended_before = _state(server)["blend_totals"].get("blended_requests", 0)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(_post, server, "/generate", body)
        deadline = time.monotonic() + TIMEOUT
        while _state(server)["blend_totals"].get("blended_requests", 0) == blended_before:
            assert not running.done(), running.result().text
            assert time.monotonic() < deadline, "the request was never blended"
            time.sleep(0.2)
        decoding = _state(server)
        assert not running.done(), "the request finished before its decode could be observed"
        assert decoding["blend_totals"]["reused_tokens"] > 0
        assert rid not in json.dumps(decoding)  # G11: no other request's id in /server_info
        assert decoding["chunk_index"]["locked_size"] == 0, "hits stay locked during decode"
        requests.post(server.base_url + "/abort_request", json={"rid": rid}, timeout=60)
        running.result()
    state = _state_once_released(server)
    assert state["chunk_index"]["locked_size"] == 0
    assert state["token_pool"]["protected"] == 0


def _state_once_released(server, timeout_s: float = 30.0) -> dict:
    """The server's state once nothing is protected or locked, or the last one read after
    ``timeout_s``: the scheduler releases an aborted request's slots in its own loop, which may
    come after the request's HTTP answer, so one immediate read can race it (it failed once on
    a loaded machine); a leak still fails, at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = _state(server)
        idle = state["token_pool"]["protected"] == 0 and state["chunk_index"]["locked_size"] == 0
        if idle or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def test_idle_server_holds_no_chunk_locks_and_flush_returns_every_slot(server):
    cb.precompute_chunks(server.base_url, _passages(2))
    state = _state(server)
    pool = state["token_pool"]
    assert pool["protected"] == 0
    assert state["chunk_index"]["locked_size"] == 0
    assert state["chunk_index"]["evictable_size"] > 0
    assert pool["available"] + pool["evictable"] == pool["total"]
    requests.post(server.base_url + "/flush_cache", timeout=60).raise_for_status()
    flushed = _state(server)
    assert flushed["token_pool"]["available"] == flushed["token_pool"]["total"]
    assert flushed["token_pool"]["evictable"] == 0
    assert flushed["chunk_index"]["num_entries"] == 0


def test_spans_are_checked_against_the_ids_sglang_keeps(tokenizer, monkeypatch):
    """Review F11: --allow-auto-truncate shortened input_ids after the spans were validated;
    the scheduler then met spans past the prompt's end. Spans are now checked afterwards."""
    import asyncio
    from types import SimpleNamespace

    import pytest

    from sglang_cacheblend.options import ENV_VAR, ServerOptions
    from sglang_cacheblend.srt.tokenizer_hooks import tokenize_with_chunks

    monkeypatch.setenv(ENV_VAR, ServerOptions(enabled=True).to_env())
    manager = SimpleNamespace(tokenizer=tokenizer, context_len=8192,
                              model_config=SimpleNamespace(num_hidden_layers=30))

    async def truncating(_manager, request):  # what SGLang's auto-truncation does in place
        del request.input_ids[40:]
        return SimpleNamespace(input_ids=list(request.input_ids), kv_hints=request.kv_hints,
                               extra_key=request.extra_key)

    obj = _normalized_request(input_ids=list(range(1000, 1100)),
                              kv_hints=chunk_hints([(0, 30), (30, 90)]))
    with pytest.raises(ValueError, match=r"chunk span 1 \[30, 90\) is outside the prompt of 40"):
        asyncio.run(tokenize_with_chunks(truncating, manager, obj))


def test_tokenizer_hook_puts_a_family_members_own_context_before_it(tokenizer, monkeypatch):
    from types import SimpleNamespace

    from sglang_cacheblend.options import ENV_VAR, ServerOptions
    from sglang_cacheblend.serving.layout import ChunkLayout
    from sglang_cacheblend.srt.layout_envelope import layout_of

    monkeypatch.setenv(ENV_VAR, ServerOptions(enabled=True, min_chunk_tokens=1,
                                              chunk_context="Server text.\n\n").to_env())
    manager = SimpleNamespace(tokenizer=tokenizer, context_len=8192,
                              model_config=SimpleNamespace(num_hidden_layers=30,
                                                           vocab_size=49152))
    ids = tokenizer.encode("a passage given as token ids", add_special_tokens=False)
    own = [101, 102, 103]
    obj = _normalized_request(input_ids=list(ids), kv_hints=precompute_hints(
        context_family="random-3", context_ids=own))
    tokenized = _run_tokenizer_hook(manager, obj)
    request = layout_of(SimpleNamespace(kv_hints=tokenized.kv_hints, rid="p"))
    bos = tokenizer.bos_token_id
    assert obj.input_ids == [bos, *own, *ids]  # its own context, not the server's
    assert request.context == tuple(own) and request.family == "random-3"
    assert request.variant == f"standalone-after:{bos}+family:random-3"
    assert ChunkLayout.from_payload(request.to_payload()) == request
    # A blended request names the family only; its blended prefix is its own.
    keys = set()
    for family in (None, "random-3"):
        obj = _normalized_request(input_ids=[*ids, *ids], kv_hints=chunk_hints(
            [(0, len(ids))], context_family=family))
        tokenized = _run_tokenizer_hook(manager, obj)
        keys.add(tokenized.extra_key)
        blended = layout_of(SimpleNamespace(kv_hints=tokenized.kv_hints, rid="b"))
        assert blended.context == (() if family else blended.context)
        assert (blended.family == "random-3") == (family is not None)
    assert len(keys) == 2
    obj = _normalized_request(input_ids=list(ids), kv_hints=precompute_hints(
        context_family="random-3", context_ids=[49152]))
    with pytest.raises(ValueError, match="vocabulary"):
        _run_tokenizer_hook(manager, obj)


def test_a_missed_chunk_with_its_sink_and_context_fits_the_models_positions(tokenizer,
                                                                           monkeypatch):
    """Issue 25 G10: a chunk up to ``context_len`` long was accepted, but a miss is computed
    after the sink and the server's chunk context, past the model's last position."""
    import asyncio
    from types import SimpleNamespace

    import pytest

    from sglang_cacheblend.options import ENV_VAR, ServerOptions
    from sglang_cacheblend.srt.tokenizer_hooks import tokenize_with_chunks

    context = "Some preceding text for every chunk.\n\n"
    monkeypatch.setenv(ENV_VAR, ServerOptions(enabled=True, chunk_context=context).to_env())
    manager = SimpleNamespace(tokenizer=tokenizer, context_len=120,
                              model_config=SimpleNamespace(num_hidden_layers=30))
    prefix_len = 1 + len(tokenizer.encode(context, add_special_tokens=False))

    async def keep(_manager, request):
        return SimpleNamespace(input_ids=list(request.input_ids), kv_hints=request.kv_hints,
                               extra_key=request.extra_key)

    fits = 120 - prefix_len
    obj = _normalized_request(input_ids=list(range(1000, 1000 + fits + 1)),
                              kv_hints=chunk_hints([(0, fits)]))
    asyncio.run(tokenize_with_chunks(keep, manager, obj))  # the longest chunk that fits
    obj = _normalized_request(input_ids=list(range(1000, 1000 + fits + 2)),
                              kv_hints=chunk_hints([(0, fits + 1)]))
    with pytest.raises(ValueError, match=f"more than the limit of {fits}"):
        asyncio.run(tokenize_with_chunks(keep, manager, obj))


def test_chunks_with_positional_embed_overrides_are_refused(tokenizer, monkeypatch):
    """Issue 25 G12: a precompute with overridden embeddings filed that KV under the plain
    tokens' key, for every later request of those tokens."""
    import asyncio
    from types import SimpleNamespace

    import pytest

    from sglang_cacheblend.options import ENV_VAR, ServerOptions
    from sglang_cacheblend.srt.tokenizer_hooks import tokenize_with_chunks

    monkeypatch.setenv(ENV_VAR, ServerOptions(enabled=True).to_env())
    manager = SimpleNamespace(tokenizer=tokenizer, context_len=8192,
                              model_config=SimpleNamespace(num_hidden_layers=30))

    async def never(_manager, request):
        raise AssertionError("SGLang's tokenization must not run")

    for hints in (precompute_hints(), chunk_hints([(0, 40)])):
        obj = _normalized_request(input_ids=list(range(1000, 1050)), kv_hints=hints)
        obj.positional_embed_overrides = {"positions": [0]}
        with pytest.raises(ValueError, match="positional_embed_overrides"):
            asyncio.run(tokenize_with_chunks(never, manager, obj))
