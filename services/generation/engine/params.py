"""Validation of request parameters at the edge, with messages a person can act on (TGI-style)."""

from __future__ import annotations

from nightcap.v1 import common_pb2
from services.common.errors import InvalidArgument
from services.generation.engine.sampling import SamplingConfig

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 200


def check_prompt(prompt_tokens: int, context_length: int) -> None:
    if prompt_tokens == 0:
        raise InvalidArgument("the prompt is empty: send text or token ids")
    if prompt_tokens >= context_length:
        raise InvalidArgument(
            f"the prompt is {prompt_tokens} tokens, but the model's context window is {context_length} tokens"
            " and at least one must be left for the answer: shorten the prompt"
        )


def sampling_config(
    params: common_pb2.SamplingParams, prompt_tokens: int, context_length: int, default_max_new_tokens: int
) -> SamplingConfig:
    """Checks every field that is set; unset fields take the defaults. Raises InvalidArgument."""
    room = context_length - prompt_tokens
    if params.HasField("max_new_tokens"):
        max_new_tokens = params.max_new_tokens
        if max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if max_new_tokens > room:
            raise InvalidArgument(
                f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's"
                f" context window of {context_length} tokens: ask for at most {room} new tokens"
            )
    else:
        max_new_tokens = min(default_max_new_tokens, room)
    temperature = params.temperature if params.HasField("temperature") else 0.0
    if not temperature >= 0.0:  # also rejects NaN
        raise InvalidArgument(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    top_k = params.top_k if params.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0 (0 turns it off), got {top_k}")
    top_p = params.top_p if params.HasField("top_p") else 1.0
    if not 0.0 < top_p <= 1.0:
        raise InvalidArgument(f"top_p must be in (0, 1] (1 turns it off), got {top_p}")
    penalty = params.repetition_penalty if params.HasField("repetition_penalty") else 1.0
    if not penalty > 0.0:
        raise InvalidArgument(f"repetition_penalty must be > 0 (1 turns it off), got {penalty}")
    if len(params.stop) > MAX_STOP_SEQUENCES:
        raise InvalidArgument(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(params.stop)}")
    for stop in params.stop:
        if not stop or len(stop) > MAX_STOP_LENGTH:
            raise InvalidArgument(f"each stop sequence must be 1 to {MAX_STOP_LENGTH} characters, got {stop!r}")
    return SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=penalty,
        stop=tuple(params.stop),
        seed=params.seed if params.HasField("seed") else None,
    )
