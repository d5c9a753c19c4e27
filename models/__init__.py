"""memtrain.models: the built-in ``gpt`` family and the model sources (gpt, hf, python)."""

from memtrain.models.gpt import GPT, GPTConfig, causal_lm_loss, gpt_config, gpt_num_params
from memtrain.models.built import BuiltModel
from memtrain.models.source import build_model

__all__ = ["BuiltModel", "build_model", "GPT", "GPTConfig", "causal_lm_loss", "gpt_config", "gpt_num_params"]
