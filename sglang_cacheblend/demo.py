"""``sglang-cacheblend demo``: one RAG question over a few passages, answered by a real server."""

from __future__ import annotations

import time
from pathlib import Path

import requests

from sglang_cacheblend.launch import ServerProcess

PASSAGES = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built it "
    "between 1887 and 1889.",
    "Mount Fuji is the highest mountain in Japan, at 3,776 metres. It is an active "
    "stratovolcano on Honshu island, about 100 kilometres south-west of Tokyo.",
    "The Danube is the second-longest river in Europe. It flows through ten countries, "
    "including Austria, Hungary and Romania, before reaching the Black Sea.",
)
QUESTION = "Who is the Eiffel Tower named after?"
SYSTEM = "Answer the question using only the passages. Answer in a few words."


def rag_messages(passages: tuple[str, ...], question: str) -> list[dict[str, str]]:
    context = "\n\n".join(f"Passage {i + 1}: {p}" for i, p in enumerate(passages))
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"{context}\n\nQuestion: {question}"},
    ]


def run_demo(
    model_path: Path, *, port: int, extra_args: list[str], log_path: Path | None = None
) -> str:
    print(f"starting SGLang with {model_path} on 127.0.0.1:{port} (log: {log_path})", flush=True)
    started = time.monotonic()
    with ServerProcess(
        args=extra_args, port=port, model_path=model_path, log_path=log_path
    ) as server:
        print(f"server ready in {time.monotonic() - started:.0f} s", flush=True)
        t0 = time.monotonic()
        response = requests.post(
            server.base_url + "/v1/chat/completions",
            json={
                "model": "default",
                "messages": rag_messages(PASSAGES, QUESTION),
                "temperature": 0,
                "max_tokens": 32,
            },
            timeout=300,
        )
        response.raise_for_status()
        answer = response.json()["choices"][0]["message"]["content"].strip()
        print(f"question: {QUESTION}")
        print(f"answer:   {answer}   ({time.monotonic() - t0:.1f} s)")
    return answer
