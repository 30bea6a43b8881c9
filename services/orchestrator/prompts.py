"""Prompt formats: how a conversation and its retrieved context become the text the model sees.

The orchestrator holds no model and no tokenizer, so it renders a model's chat template itself from
the template text that the generation service reports (ModelInfo.chat_template), in the same Jinja
sandbox transformers uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.common.errors import FailedPrecondition

CONTEXT_INSTRUCTION = "Answer the question using the context below when it is relevant."
CONTEXT_HEADING = "Relevant information:"


@dataclass(frozen=True)
class ContextPassage:
    title: str
    text: str
    source: str


@dataclass(frozen=True)
class Turn:
    role: str  # "system", "user" or "assistant"
    content: str
    context: tuple[ContextPassage, ...] = ()  # passages given with this user turn, shown beside it


@dataclass(frozen=True)
class PromptPieces:
    """A rendered prompt cut where its token count can be summed: ``head + "".join(turns) + tail``.

    Each turn's piece is the same text whichever turns surround it, so its tokens are counted once and
    reused while history is trimmed, and in the conversation's next turns."""

    head: str
    turns: list[str]
    tail: str

    @property
    def text(self) -> str:
        return self.head + "".join(self.turns) + self.tail


def context_block(passages: list[ContextPassage]) -> str:
    # One plain line per passage, led by its title (default-corpus passages already start with it).
    # Numbering them ("[1] ...") made SmolLM2-135M garble names in its answers.
    return "\n".join(_context_line(p) for p in passages)


def _context_line(passage: ContextPassage) -> str:
    if not passage.title or passage.text.startswith(f"{passage.title}:"):
        return passage.text
    return f"{passage.title}: {passage.text}"


class ChatTemplatePrompt:
    """The model's own chat template; context follows the new user message.

    Measured on SmolLM2-135M with the Zurich passages: context after the question (keeping the model's
    own system prompt) gave "Zurich is the largest city in Switzerland ..."; the same context in a
    system message gave "... located in the northern part of the Swiss Alps"."""

    def __init__(self, template: str, bos_token: str = "", eos_token: str = "") -> None:
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        environment.globals["raise_exception"] = _raise_template_error
        environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = environment.from_string(template)
        except TemplateError as error:
            raise FailedPrecondition(f"the model's chat template does not parse: {error}") from None
        self._bos, self._eos = bos_token, eos_token
        self.stop: list[str] = []

    def render(self, turns: list[Turn]) -> str:
        return self._render(turns, add_generation_prompt=True)

    def pieces(self, turns: list[Turn]) -> PromptPieces | None:
        """The prompt cut into per-turn pieces, or None for a template whose turns do not render alone."""
        whole = self.render(turns)
        anchor = [Turn("system", "-")]
        before = self._render(anchor, add_generation_prompt=False)
        pieces = []
        for turn in turns:
            alone = self._render([*anchor, turn], add_generation_prompt=False)
            if not alone.startswith(before):
                return None
            pieces.append(alone[len(before) :])
        without_prompt = self._render(turns, add_generation_prompt=False)
        tail = whole[len(without_prompt) :]
        body = "".join(pieces) + tail
        if not whole.startswith(without_prompt) or not whole.endswith(body):
            return None
        return PromptPieces(whole[: len(whole) - len(body)], pieces, tail)

    def _render(self, turns: list[Turn], add_generation_prompt: bool) -> str:
        messages = [{"role": t.role, "content": _content(t)} for t in turns]
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self._bos, eos_token=self._eos
            )
        except TemplateError as error:
            raise FailedPrecondition(f"the model's chat template failed on this conversation: {error}") from None


class OpenChatKitPrompt:
    """OpenChatKit's format: ``<human>: ...`` / ``<bot>: ...`` turns, ending in ``<bot>:``.

    As in OpenChatKit's bot.py, retrieved context is given as a human turn before the question, and a
    system message (which the format lacks) leads the prompt as plain text."""

    HUMAN, BOT = "<human>", "<bot>"

    def __init__(self) -> None:
        self.stop = [f"{self.HUMAN}:"]

    def render(self, turns: list[Turn]) -> str:
        return self.pieces(turns).text

    def pieces(self, turns: list[Turn]) -> PromptPieces:
        return PromptPieces("", [f"{self._lines(turn)}\n" for turn in turns], f"{self.BOT}:")

    def _lines(self, turn: Turn) -> str:
        if turn.role == "system":
            return turn.content
        speaker = self.HUMAN if turn.role == "user" else self.BOT
        line = f"{speaker}: {turn.content}"
        if turn.context:
            return f"{self.HUMAN}: {CONTEXT_INSTRUCTION}\n{context_block(list(turn.context))}\n{line}"
        return line


PromptFormat = ChatTemplatePrompt | OpenChatKitPrompt


def prompt_format_for(name: str, chat_template: str, bos_token: str, eos_token: str) -> PromptFormat:
    if name == "chat_template" and chat_template:
        return ChatTemplatePrompt(chat_template, bos_token, eos_token)
    if name == "openchatkit":
        return OpenChatKitPrompt()
    raise FailedPrecondition(f"the generation service reports prompt format {name!r}, which the orchestrator lacks")


def _content(turn: Turn) -> str:
    if not turn.context:
        return turn.content
    return f"{turn.content}\n\n{CONTEXT_HEADING}\n{context_block(list(turn.context))}"


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)
