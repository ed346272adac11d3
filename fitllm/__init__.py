"""fitllm: an LLM inference engine that serves a model in whatever memory it is given."""

from fitllm.onednn import bound_primitive_caches
from fitllm.openmp import choose_wait_policy

choose_wait_policy()  # before anything imports torch: libgomp reads it once, when it loads
bound_primitive_caches()  # before torch's first oneDNN primitive: the caches read their capacity once

from fitllm.config import EngineConfig  # noqa: E402
from fitllm.engine.engine import Engine  # noqa: E402
from fitllm.engine.llm import LLM  # noqa: E402
from fitllm.engine.request import RequestOutput, SamplingParams  # noqa: E402
from fitllm.engine.structured.spec import StructuredOutput  # noqa: E402

__all__ = ["LLM", "Engine", "EngineConfig", "RequestOutput", "SamplingParams", "StructuredOutput"]
__version__ = "0.1.0"
