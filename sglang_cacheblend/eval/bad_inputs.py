"""The bad-input matrix: malformed chunk requests on every interface, and what the server says.

Each case is ``(name, path, body, text the 4xx answer must contain)``; a body is JSON, or raw
bytes for what JSON cannot say (non-UTF-8, ``1e999``). ``tests/srt/test_bad_inputs_server.py``
asserts every answer; ``python -m sglang_cacheblend.eval.bad_inputs --url URL`` writes the
table of answers that ``docs/reliability.md`` shows (against a default ``--enable-cacheblend``
server of the embedded 30-layer model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import requests

import sglang_cacheblend as cb
from sglang_cacheblend.chunks import CHUNK_CLOSE, CHUNK_OPEN, chunk_hints, precompute_hints

__all__ = ["MATRIX", "PASSAGE", "post", "probe"]

TIMEOUT = 300
IDS = list(range(1000, 1040))  # 40 plain token ids
PASSAGE = "The Eiffel Tower is in Paris, the capital of France, and was built in 1889."


def _hints(payload: object, *, kind: str = "cacheblend.chunks", version: str = "1") -> dict:
    action = {"action_id": "a", "action_type": kind, "action_version": version,
              "payload": payload}
    return {"protocol_version": "1", "message_id": "m", "actions": [action]}


def _ids_request(payload: object, **kw) -> dict:
    return {"input_ids": IDS, "kv_hints": _hints(payload, **kw)}


def _chat(*messages: dict, **extra) -> dict:
    return {"model": "default", "messages": list(messages), "max_tokens": 2, **extra}


# (name, path, JSON body or raw bytes, text the 4xx answer must contain)
MATRIX: list[tuple[str, str, object, str]] = [
    # /generate, chunk markers in the text
    ("unclosed marker", "/generate", {"text": f"a {CHUNK_OPEN} b"}, "never closed"),
    ("stray end marker", "/generate", {"text": f"a {CHUNK_CLOSE} b"}, "no matching start marker"),
    ("nested markers", "/generate", {"text": f"{CHUNK_OPEN}x{cb.chunk('y')}{CHUNK_CLOSE}"},
     "cannot nest"),
    ("empty chunk", "/generate", {"text": f"q {CHUNK_OPEN} {CHUNK_CLOSE}"}, "is empty"),
    ("chunk longer than the context", "/generate", {"text": cb.chunk("word " * 9000)},
     "more than the limit of"),
    ("tiny chunk", "/generate", {"text": "Q: " + cb.chunk("Paris") + " where?"},
     "fewer than this server's minimum of 16"),
    ("markers and an action", "/generate",
     {"text": cb.chunk(PASSAGE) + " more", "kv_hints": chunk_hints([(0, 1)])}, "not both"),
    ("precompute of two chunks", "/generate",
     {"text": cb.chunk(PASSAGE) + cb.chunk(PASSAGE), "kv_hints": precompute_hints()},
     "exactly one chunk"),
    # /generate, explicit spans in kv_hints
    ("span outside the prompt", "/generate", _ids_request({"spans": [[5, 50]]}),
     "outside the prompt of 40"),
    ("overlapping spans", "/generate", _ids_request({"spans": [[0, 20], [16, 36]]}),
     "must not overlap"),
    ("unsorted spans", "/generate", _ids_request({"spans": [[20, 36], [0, 16]]}), "sorted"),
    ("empty span", "/generate", _ids_request({"spans": [[4, 4]]}), "is empty"),
    ("spans not a list", "/generate", _ids_request({"spans": "0-16"}),
     "list of [start, end] pairs"),
    ("float span", "/generate", _ids_request({"spans": [[0.5, 16]]}), "pair of ints"),
    ("huge span end", "/generate", _ids_request({"spans": [[0, 10**30]]}), "pair of ints"),
    ("infinite span end (1e999)", "/generate",
     json.dumps(_ids_request({"spans": [[0, 16]]})).replace("16]]", "1e999]]").encode(),
     "number is infinity"),
    ("too many chunks", "/generate",
     {"input_ids": list(range(1000, 1000 + 16 * 300)),
      "kv_hints": chunk_hints([(16 * i, 16 * i + 16) for i in range(300)])},
     "300 chunks in one request, more than this server's limit of 256"),
    ("one-token chunks", "/generate", _ids_request({"spans": [[i, i + 1] for i in range(30)]}),
     "fewer than this server's minimum"),
    ("ratio above 1", "/generate", _ids_request({"spans": [[0, 16]], "recompute_ratio": 1.5}),
     "recompute_ratio must be in [0, 1], got 1.5"),
    ("ratio as a string", "/generate",
     _ids_request({"spans": [[0, 16]], "recompute_ratio": "0.1"}), "recompute_ratio"),
    ("infinite ratio (1e999)", "/generate",
     json.dumps(_ids_request({"spans": [[0, 16]], "recompute_ratio": 0.5})).replace(
         "0.5", "1e999").encode(), "number is infinity"),
    ("unknown selector", "/generate", _ids_request({"spans": [[0, 16]], "selector": "nope"}),
     "selector must be one of"),
    ("selector as a list", "/generate",
     _ids_request({"spans": [[0, 16]], "selector": ["v_deviation"]}), "selector must be one of"),
    ("schedule past the model's depth", "/generate",
     _ids_request({"spans": [[0, 16]], "gradual": [[30, 0.15]]}),
     "selection layer 30 is not a layer of the served model (30 layers"),
    ("schedule with rising ratios", "/generate",
     _ids_request({"spans": [[0, 16]], "gradual": [[1, 0.1], [4, 0.3]]}),
     "ratios must not increase"),
    ("schedule not a list", "/generate", _ids_request({"spans": [[0, 16]], "gradual": "x"}),
     "gradual must be a list"),
    ("unknown payload key", "/generate", _ids_request({"spans": [[0, 16]], "ratio": 0.1}),
     "unknown keys ['ratio']"),
    ("payload not an object", "/generate", _ids_request([0, 16]),
     "Expected `object`, got `array`"),
    ("unknown action version", "/generate", _ids_request({"spans": [[0, 16]]}, version="2"),
     "action_version must be '1'"),
    ("two CacheBlend actions", "/generate",
     {"input_ids": IDS, "kv_hints": {"protocol_version": "1", "message_id": "m", "actions": [
         _hints({"spans": [[0, 16]]})["actions"][0]] * 2}}, "2 CacheBlend actions"),
    ("server-only action type", "/generate",
     _ids_request({"precompute": False, "spans": [[0, 40]], "sink": [1], "blend": None},
                  kind="cacheblend.server"), "reserved for the server"),
    ("reserved extra_key on a plain request", "/generate",
     {"text": "Hello", "extra_key": "cacheblend:v1:r0.2:abc|"}, "reserved"),
    ("malformed kv_hints envelope", "/generate", {"input_ids": IDS, "kv_hints": {"actions": 3}},
     "expected a sequence"),
    ("body that is not UTF-8", "/generate", b'{"text": "\xff\xfe caf\xe9"}', "JSON decode error"),
    # /v1/chat/completions
    ("chat: unclosed marker", "/v1/chat/completions",
     _chat({"role": "user", "content": f"a {CHUNK_OPEN}"}),
     "messages[0]: chunk start marker at character 2 is never closed"),
    ("chat: chunk across messages", "/v1/chat/completions",
     _chat({"role": "system", "content": f"{CHUNK_OPEN}{PASSAGE}"},
           {"role": "user", "content": f"{PASSAGE}{CHUNK_CLOSE} where?"}),
     "messages[0]: chunk start marker"),
    ("chat: empty chunk", "/v1/chat/completions",
     _chat({"role": "user", "content": f"q {CHUNK_OPEN} {CHUNK_CLOSE}"}), "is empty"),
    ("chat: tiny chunk in a tool message", "/v1/chat/completions",
     _chat({"role": "user", "content": "Look it up."},
           {"role": "tool", "content": cb.chunk("Paris"), "tool_call_id": "t"}),
     "fewer than this server's minimum"),
    ("chat: markers with continue_final_message", "/v1/chat/completions",
     _chat({"role": "user", "content": cb.chunk(PASSAGE)}, {"role": "assistant", "content": "A"},
           continue_final_message=True, add_generation_prompt=False),
     "continue_final_message"),
    # /v1/completions
    ("completions: unclosed marker", "/v1/completions",
     {"model": "default", "prompt": f"a {CHUNK_OPEN} b", "max_tokens": 2}, "never closed"),
    ("completions: tiny chunk", "/v1/completions",
     {"model": "default", "prompt": "Q " + cb.chunk("Paris"), "max_tokens": 2},
     "fewer than this server's minimum"),
]


def post(base_url: str, path: str, body: object) -> requests.Response:
    if isinstance(body, bytes):
        return requests.post(base_url + path, data=body, timeout=TIMEOUT,
                             headers={"content-type": "application/json"})
    if path == "/generate":
        body = {"sampling_params": {"max_new_tokens": 2}, **body}
    return requests.post(base_url + path, json=body, timeout=TIMEOUT)


def probe(base_url: str) -> list[dict[str, object]]:
    """Send every case once; each answer's status, whether it names the problem, its text."""
    rows = []
    for name, path, body, message in MATRIX:
        response = post(base_url, path, body)
        rows.append({"case": name, "endpoint": path, "status": response.status_code,
                     "names_problem": message in response.text,
                     "answer": response.text.replace("\n", " ")[:160]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="a running --enable-cacheblend server")
    parser.add_argument("--out", type=Path, default=Path("docs/results/bad_inputs.md"))
    args = parser.parse_args()
    rows = probe(args.url.rstrip("/"))
    lines = ["# Bad-input matrix", "",
             f"`python -m sglang_cacheblend.eval.bad_inputs --url {args.url}` against "
             "`sglang-cacheblend serve --enable-cacheblend` (embedded SmolLM2, 30 layers).", "",
             "| case | endpoint | status | names the problem | answer |", "|---|---|---|---|---|"]
    for row in rows:
        answer = str(row["answer"]).replace("|", "\\|")
        lines.append(f"| {row['case']} | `{row['endpoint']}` | {row['status']} | "
                     f"{'yes' if row['names_problem'] else 'NO'} | {answer} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{sum(r['names_problem'] and 400 <= r['status'] < 500 for r in rows)}/{len(rows)} "
          f"cases answered 4xx naming the problem -> {args.out}")


if __name__ == "__main__":
    main()
