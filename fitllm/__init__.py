"""fitllm: an LLM inference engine that serves a model in whatever memory it is given."""

from fitllm.config import EngineConfig
from fitllm.engine.engine import Engine
from fitllm.engine.llm import LLM
from fitllm.engine.request import RequestOutput, SamplingParams

__all__ = ["LLM", "Engine", "EngineConfig", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
