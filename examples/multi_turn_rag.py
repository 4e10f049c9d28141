"""A multi-turn RAG conversation as an ``sgl.function`` with ``cb.chunk`` and ``sgl.gen``.

Run `sglang-cacheblend serve --enable-cacheblend` first (it listens on 127.0.0.1:30000). Each
turn re-sends the passages as chunks. The first turn blends their precomputed KV; a follow-up turn
repeats the conversation, so the server reuses the previous turn's blended KV as a prefix
(``cached_tokens``) and only the new tokens are computed. Each answer's ``meta_info`` shows what
the server did (``meta_info["cacheblend"]``).
"""

from __future__ import annotations

import argparse

import sglang as sgl

import sglang_cacheblend as cb

PASSAGES = [
    "Marie Curie was born in Warsaw in 1867 and moved to Paris in 1891. " * 10,
    "Curie won the Nobel Prize in Physics in 1903 and in Chemistry in 1911. " * 10,
]


@sgl.function
def rag_turn(s, history, question):
    # The embedded model speaks ChatML; the prompt is written out so chunk markers stay in place.
    s += "<|im_start|>system\nAnswer from the passages.<|im_end|>\n<|im_start|>user\n"
    for passage in PASSAGES:
        s += cb.chunk(passage)
    for previous_question, previous_answer in history:
        s += f"Question: {previous_question}<|im_end|>\n<|im_start|>assistant\n"
        s += f"{previous_answer}<|im_end|>\n<|im_start|>user\n"
    s += f"Question: {question}<|im_end|>\n<|im_start|>assistant\n"
    s += sgl.gen("answer", max_tokens=32, stop="<|im_end|>", temperature=0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    args = parser.parse_args()
    sgl.set_default_backend(sgl.RuntimeEndpoint(args.url))
    cb.precompute_chunks(args.url, PASSAGES)
    history: list[tuple[str, str]] = []
    for question in ["Where was Marie Curie born?", "Which prizes did she win, and when?"]:
        state = rag_turn.run(history=history, question=question)
        answer = state["answer"].strip()
        meta = state.get_meta_info("answer")
        report = (meta.get("cacheblend") or [{}])[0]
        print(f"Q: {question}\nA: {answer}")
        print(f"   prompt tokens {meta['prompt_tokens']}, prefix-cached {meta['cached_tokens']}, "
              f"blended {report.get('blended')}, chunk tokens reused "
              f"{report.get('chunk_reused_tokens', 0)}\n")
        history.append((question, answer))


if __name__ == "__main__":
    main()
