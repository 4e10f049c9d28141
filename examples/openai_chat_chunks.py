"""The OpenAI client with chunks marked inside message content.

Run `sglang-cacheblend serve --enable-cacheblend` first (it listens on 127.0.0.1:30000).
"""

from __future__ import annotations

import argparse

from openai import OpenAI

import sglang_cacheblend as cb

PASSAGE = ("The Danube is Europe's second-longest river. It flows through ten countries, "
           "including Austria, Hungary and Romania, into the Black Sea. ") * 12


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    args = parser.parse_args()
    cb.precompute_chunks(args.url, [PASSAGE])
    client = OpenAI(base_url=args.url + "/v1", api_key="none")
    reply = client.chat.completions.create(
        model="default", temperature=0, max_tokens=24,
        messages=[{"role": "system", "content": "Answer from the passage."},
                  {"role": "user", "content": cb.chunk(PASSAGE) + "Into which sea does the "
                   "Danube flow?"}],
    )
    print(reply.choices[0].message.content)


if __name__ == "__main__":
    main()
