"""/generate with chunk markers: precompute passages once, then ask questions over any order.

Run `sglang-cacheblend serve --enable-cacheblend` first (it listens on 127.0.0.1:30000).
"""

from __future__ import annotations

import argparse

import requests

import sglang_cacheblend as cb

PASSAGES = [
    "The Eiffel Tower was designed by the engineering company of Gustave Eiffel and completed "
    "in 1889 for the World's Fair in Paris. " * 12,
    "Mount Fuji, Japan's highest peak at 3,776 metres, last erupted in 1707 and stands about "
    "100 kilometres south-west of Tokyo. " * 12,
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    args = parser.parse_args()
    cb.precompute_chunks(args.url, PASSAGES)
    for order in ([0, 1], [1, 0]):
        # The embedded model is a ChatML chat model; /generate takes the rendered prompt as text.
        text = "<|im_start|>system\nAnswer from the passages.<|im_end|>\n<|im_start|>user\n"
        text += "".join(cb.chunk(PASSAGES[i]) for i in order)
        text += "Question: When was the Eiffel Tower completed?<|im_end|>\n<|im_start|>assistant\n"
        out = requests.post(args.url + "/generate", timeout=600, json={
            "text": text, "sampling_params": {"temperature": 0, "max_new_tokens": 16}}).json()
        print(order, out["text"].strip())
    info = requests.get(args.url + "/server_info", timeout=60).json()
    print("chunk index:", info["internal_states"][0]["cacheblend"].get("chunk_index"))


if __name__ == "__main__":
    main()
