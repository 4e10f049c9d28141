"""SGLang's Qwen2 and Qwen3 with the blended extend (see :mod:`.llama`)."""

from sglang.srt.models.qwen2 import Qwen2ForCausalLM as _SGLangQwen2
from sglang.srt.models.qwen3 import Qwen3ForCausalLM as _SGLangQwen3

from sglang_cacheblend.srt.blended_extend import BlendedExtendMixin


class Qwen2ForCausalLM(BlendedExtendMixin, _SGLangQwen2):
    """SGLang's ``Qwen2ForCausalLM`` with the blended extend."""


class Qwen3ForCausalLM(BlendedExtendMixin, _SGLangQwen3):
    """SGLang's ``Qwen3ForCausalLM`` (per-head q/k norms) with the blended extend."""


EntryClass = [Qwen2ForCausalLM, Qwen3ForCausalLM]
