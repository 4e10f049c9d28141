"""SGLang's Llama (also SmolLM2) and Mistral with the blended extend.

Loaded through SGLang's own seam for out-of-tree models: ``SGLANG_EXTERNAL_MODEL_PACKAGE``
(set by ``--enable-cacheblend``) makes SGLang's model registry take these classes for the
architectures they are named after.
"""

from sglang.srt.models.llama import LlamaForCausalLM as _SGLangLlama
from sglang.srt.models.mistral import MistralForCausalLM as _SGLangMistral

from sglang_cacheblend.srt.blended_extend import BlendedExtendMixin


class LlamaForCausalLM(BlendedExtendMixin, _SGLangLlama):
    """SGLang's ``LlamaForCausalLM`` (also SmolLM2) with the blended extend."""


class MistralForCausalLM(BlendedExtendMixin, _SGLangMistral):
    """SGLang's ``MistralForCausalLM`` with the blended extend."""


EntryClass = [LlamaForCausalLM, MistralForCausalLM]
