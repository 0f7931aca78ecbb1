"""GEM glue: env construction with wrappers, prompt templates, offline math datasets."""

from gemtinker.envs.factory import EnvFactory, check_env_id, parse_wrappers
from gemtinker.envs.math_data import MathDatasetError, generate_arithmetic, read_question_answer_file
from gemtinker.envs.templates import TEMPLATE_NAMES, apply_template, check_template, encode_prompt, reply_prefix

__all__ = [
    "EnvFactory",
    "MathDatasetError",
    "TEMPLATE_NAMES",
    "apply_template",
    "check_env_id",
    "check_template",
    "encode_prompt",
    "generate_arithmetic",
    "parse_wrappers",
    "read_question_answer_file",
    "reply_prefix",
]
