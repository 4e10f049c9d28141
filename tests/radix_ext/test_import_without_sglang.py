"""radix_ext must import, and work, with every `sglang` import blocked."""

from __future__ import annotations

from tests.sglang_blocked import run_without_sglang


def test_radix_ext_imports_without_sglang():
    run_without_sglang(
        """
        import torch
        import radix_ext
        import radix_ext.chunk_index, radix_ext.chunk_types  # noqa: E401
        import radix_ext.entry, radix_ext.keys  # noqa: E401

        class Pool:
            def free(self, kv_loc):
                self.freed = kv_loc.tolist()

        pool = Pool()
        index = radix_ext.ChunkIndex(pool)
        namespace = radix_ext.ChunkNamespace("m")
        index.insert(namespace, [1, 2], torch.tensor([5, 6]), 0)
        match = index.match(namespace, [0, 1, 2], [(1, 3)])[0]
        assert match.hit and (match.start, match.end) == (1, 3)
        assert index.evict(2) == (2, 1)
        assert pool.freed == [5, 6]
        """
    )
