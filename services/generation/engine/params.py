"""Validation of request parameters at the edge, with messages a person can act on (TGI-style)."""

from __future__ import annotations

import json
import math

from nightcap.v1 import common_pb2
from services.common.errors import InvalidArgument
from services.generation.engine.constraints import ConstraintSpec
from services.generation.engine.sampling import MAX_TOP_LOGPROBS, SamplingConfig

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 200
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300  # entries (OpenAI's bound)
MAX_CONSTRAINT_CHARS = 256 * 1024
MAX_CHOICES = 1024


def constraint_spec(params: common_pb2.SamplingParams) -> ConstraintSpec | None:
    """The request's constraint checked for what can be checked without compiling it; None when it has none.
    Raises InvalidArgument naming the field."""
    if not params.HasField("constraint"):
        return None
    kind = params.constraint.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(
            "constraint is set but empty: set one of json_schema, json_object, regex, lark, gbnf or choice"
        )
    field = f"constraint.{kind}"
    if kind == "json_object":
        if not params.constraint.json_object:
            raise InvalidArgument("constraint.json_object must be true when set (unset the constraint for free text)")
        return ConstraintSpec(kind, "")
    if kind == "choice":
        options = list(params.constraint.choice.options)
        if not options:
            raise InvalidArgument("constraint.choice: give at least one option")
        if len(options) > MAX_CHOICES:
            raise InvalidArgument(f"constraint.choice: at most {MAX_CHOICES} options, got {len(options)}")
        if any(not option for option in options):
            raise InvalidArgument("constraint.choice: an option is empty; every option needs at least one character")
        return ConstraintSpec(kind, json.dumps(options))
    text = getattr(params.constraint, kind)
    if not text.strip():
        raise InvalidArgument(f"{field} is empty")
    if len(text) > MAX_CONSTRAINT_CHARS:
        raise InvalidArgument(f"{field} is {len(text)} characters; at most {MAX_CONSTRAINT_CHARS} are allowed")
    if kind == "json_schema":
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as error:
            raise InvalidArgument(f"constraint.json_schema: not valid JSON: {error}") from None
        if not isinstance(schema, dict):
            raise InvalidArgument(
                f"constraint.json_schema: a schema is a JSON object, got {type(schema).__name__}"
                " (for any JSON object use constraint.json_object)"
            )
    return ConstraintSpec(kind, text)


def logit_bias(params: common_pb2.SamplingParams, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` checked, each bias clamped to [-100, 100], sorted by token id."""
    if len(params.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidArgument(f"logit_bias: at most {MAX_LOGIT_BIAS} entries, got {len(params.logit_bias)}")
    biases = []
    for token, bias in sorted(params.logit_bias.items()):
        if token >= vocab_size:
            raise InvalidArgument(
                f"logit_bias: token id {token} is outside the vocabulary of {vocab_size} (ids 0..{vocab_size - 1})"
            )
        if math.isnan(bias):
            raise InvalidArgument(f"logit_bias: the bias of token id {token} must be a number, got NaN")
        biases.append((token, min(100.0, max(-100.0, bias))))
    return tuple(biases)


def check_prompt(prompt_tokens: int, context_length: int) -> None:
    if prompt_tokens == 0:
        raise InvalidArgument("the prompt is empty: send text or token ids")
    if prompt_tokens >= context_length:
        raise InvalidArgument(
            f"the prompt is {prompt_tokens} tokens, but the model's context window is {context_length} tokens"
            " and at least one must be left for the answer: shorten the prompt"
        )


def _optional(params: common_pb2.SamplingParams, name: str, default: float) -> float:
    value = getattr(params, name) if params.HasField(name) else default
    if isinstance(value, float) and math.isnan(value):
        raise InvalidArgument(f"{name} must be a number, got NaN")
    return value


def sampling_config(
    params: common_pb2.SamplingParams,
    prompt_tokens: int,
    context_length: int,
    default_max_new_tokens: int,
    vocab_size: int,
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
    temperature = _optional(params, "temperature", 0.0)
    if temperature < 0.0:
        raise InvalidArgument(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if params.HasField("do_sample"):
        if not params.do_sample:
            temperature = 0.0
        elif temperature == 0.0:
            if params.HasField("temperature"):
                raise InvalidArgument("do_sample=true needs a temperature above 0, got 0")
            temperature = 1.0
    top_k = int(_optional(params, "top_k", 0))
    if top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0 (0 turns it off), got {top_k}")
    top_p = _optional(params, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise InvalidArgument(f"top_p must be in (0, 1] (1 turns it off), got {top_p}")
    typical_p = _optional(params, "typical_p", 1.0)
    if not 0.0 < typical_p <= 1.0:
        raise InvalidArgument(f"typical_p must be in (0, 1] (1 turns it off), got {typical_p}")
    penalty = _optional(params, "repetition_penalty", 1.0)
    if not penalty > 0.0:
        raise InvalidArgument(f"repetition_penalty must be > 0 (1 turns it off), got {penalty}")
    frequency = _optional(params, "frequency_penalty", 0.0)
    presence = _optional(params, "presence_penalty", 0.0)
    for name, value in (("frequency_penalty", frequency), ("presence_penalty", presence)):
        if not -2.0 <= value <= 2.0:
            raise InvalidArgument(f"{name} must be in [-2, 2] (0 turns it off), got {value}")
    if len(params.stop) > MAX_STOP_SEQUENCES:
        raise InvalidArgument(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(params.stop)}")
    for stop in params.stop:
        if not stop or len(stop) > MAX_STOP_LENGTH:
            raise InvalidArgument(f"each stop sequence must be 1 to {MAX_STOP_LENGTH} characters, got {stop!r}")
    if len(params.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgument(f"at most {MAX_STOP_TOKEN_IDS} stop token ids are allowed")
    bad_ids = [i for i in params.stop_token_ids if i >= vocab_size]
    if bad_ids:
        raise InvalidArgument(f"stop_token_ids {bad_ids[:5]} are outside the model's vocabulary (0..{vocab_size - 1})")
    top_logprobs = int(_optional(params, "top_logprobs", 0))
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {top_logprobs}")
    if top_logprobs and not params.logprobs:
        raise InvalidArgument("top_logprobs needs logprobs=true")
    if params.ignore_eos and params.HasField("constraint"):
        raise InvalidArgument(
            "ignore_eos cannot be combined with a constraint: the grammar decides where the output may end"
        )
    bias = logit_bias(params, vocab_size)
    return SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        typical_p=typical_p,
        repetition_penalty=penalty,
        frequency_penalty=frequency,
        presence_penalty=presence,
        stop=tuple(params.stop),
        stop_token_ids=frozenset(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        seed=params.seed if params.HasField("seed") else None,
        logprobs=params.logprobs,
        top_logprobs=top_logprobs,
        logit_bias=bias,
    )
