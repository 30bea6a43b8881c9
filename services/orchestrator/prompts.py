"""Prompt formats: how a conversation and its retrieved context become the text the model sees.

The orchestrator holds no model and no transformers tokenizer, so it renders a model's chat template itself
from the template text that the generation service reports (ModelInfo.chat_template), in the same Jinja
sandbox transformers uses; it counts and tokenizes the result with the served ``tokenizers`` tokenizer
(tokenizer.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from jinja2 import TemplateError, meta
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.common.errors import FailedPrecondition
from services.orchestrator.tools import ToolCall, ToolUse, call_text, parsed_arguments, response_text

CONTEXT_INSTRUCTION = "Answer the question using the context below when it is relevant."
CONTEXT_HEADING = "Relevant information:"
# The grounded prompt (the orchestrator's default, --prompt grounded) numbers the passages for citing; it can
# also ask for citations and tell the model what to say when the passages do not hold the answer.
ADMISSION = "The documents do not say."
CITE = "Answer from the passages below and cite the one you use, like [1]."
ADMIT = f'If they do not hold the answer, say "{ADMISSION}"'


@dataclass(frozen=True)
class ContextStyle:
    """How a turn's passages are introduced: numbered or not, and what the model is asked to do with them."""

    numbered: bool = False
    cite: bool = False  # ask for [n] citations
    admit: bool = False  # ask for ADMISSION when the passages do not hold the answer

    def heading(self, plain: str) -> str:
        """The line before the passages; ``plain`` when nothing is asked."""
        asked = [text for wanted, text in ((self.cite, CITE), (self.admit, ADMIT)) if wanted]
        if self.admit and not self.cite:
            asked = [f"Answer from the passages below. {ADMIT}"]
        return " ".join(asked) if asked else plain


PLAIN = ContextStyle()


@dataclass(frozen=True)
class ContextPassage:
    title: str
    text: str
    source: str
    id: str = ""  # the passage id, when the client sent it back with the history


@dataclass(frozen=True)
class Turn:
    role: str  # "system", "user", "assistant" or "tool"
    content: str
    context: tuple[ContextPassage, ...] = ()  # passages given with this user turn, shown beside it
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str = ""  # a tool turn: the call it answers
    name: str = ""  # a tool turn: the function that answered


def as_text_turn(turn: Turn) -> Turn:
    """A turn of a tool round trip as a template without tool support can render it: an assistant's calls
    written out as the model writes them, a tool's result as a user message."""
    if turn.tool_calls:
        calls = "\n".join(call_text(call) for call in turn.tool_calls)
        return Turn("assistant", f"{turn.content}\n{calls}" if turn.content.strip() else calls, turn.context)
    if turn.role == "tool":
        return Turn("user", response_text(turn.content), turn.context)
    return turn


def with_tools_described(turns: list[Turn], tool_use: ToolUse) -> list[Turn]:
    """The turns with the tools described in the system message (one is added when there is none)."""
    if turns and turns[0].role == "system":
        first = turns[0]
        return [Turn("system", f"{first.content}\n\n{tool_use.instruction()}", first.context), *turns[1:]]
    return [Turn("system", tool_use.instruction()), *turns]


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


def context_block(passages: list[ContextPassage], numbered: bool = False) -> str:
    """One line per passage, led by its title (default-corpus passages already start with it), and ended by its
    number ("... [1]") when the prompt asks for citations.

    The number goes last: SmolLM2-135M copies the start of a line, and with "[1] Zurich: ..." it answered
    "Zuraco: Züraco is a city in Switzerland"; with the number at the end it answered "Zurich: The largest city in
    Switzerland ... [1]", citing its passage as it copied it."""
    lines = [_context_line(p) for p in passages]
    if numbered:
        lines = [f"{line} [{number}]" for number, line in enumerate(lines, 1)]
    return "\n".join(lines)


def _context_line(passage: ContextPassage) -> str:
    if not passage.title or passage.text.startswith(f"{passage.title}:"):
        return passage.text
    return f"{passage.title}: {passage.text}"


class ChatTemplatePrompt:
    """The model's own chat template; context follows the new user message.

    Measured on SmolLM2-135M with the Zurich passages: context after the question (keeping the model's
    own system prompt) gave "Zurich is the largest city in Switzerland ..."; the same context in a
    system message gave "... located in the northern part of the Swiss Alps"."""

    def __init__(
        self,
        template: str,
        bos_token: str = "",
        eos_token: str = "",
        style: ContextStyle = PLAIN,
        tool_use: ToolUse | None = None,
    ) -> None:
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        environment.globals["raise_exception"] = _raise_template_error
        environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = environment.from_string(template)
            self.reads_tools = "tools" in meta.find_undeclared_variables(environment.parse(template))
        except TemplateError as error:
            raise FailedPrecondition(f"the model's chat template does not parse: {error}") from None
        self._bos, self._eos = bos_token, eos_token
        self.style = style
        self.stop: list[str] = []
        self._tools = tool_use.openai_tools() if tool_use is not None and self.reads_tools else None
        self.describes_tools = self._tools is not None
        self.renders_tool_calls = self.reads_tools and self._renders_tool_calls()

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
        if self.renders_tool_calls:
            messages = [_tool_message(t, self.style) for t in turns]
        else:
            messages = [{"role": t.role, "content": _content(t, self.style)} for t in map(as_text_turn, turns)]
        extra = {"tools": self._tools} if self._tools is not None else {}
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos,
                eos_token=self._eos,
                **extra,
            )
        except TemplateError as error:
            raise FailedPrecondition(f"the model's chat template failed on this conversation: {error}") from None

    def _renders_tool_calls(self) -> bool:
        """Whether the template writes out an assistant message's tool_calls itself (Qwen 2.5's, Llama 3.1's
        do; one that reads only ``content`` would drop them, and SmolLM2's fails on a call without content)."""
        probe = "nightcap_probe_function"
        call = {"id": "call_probe", "type": "function", "function": {"name": probe, "arguments": {}}}
        messages = [
            {"role": "user", "content": "?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "!", "tool_call_id": "call_probe", "name": probe},
        ]
        try:
            text = self._template.render(
                messages=messages, add_generation_prompt=True, bos_token=self._bos, eos_token=self._eos, tools=[]
            )
        except Exception:  # any failure means no: the calls are then written into the content
            return False
        return probe in text


class OpenChatKitPrompt:
    """OpenChatKit's format: ``<human>: ...`` / ``<bot>: ...`` turns, ending in ``<bot>:``.

    As in OpenChatKit's bot.py, retrieved context is given as a human turn before the question, and a
    system message (which the format lacks) leads the prompt as plain text."""

    HUMAN, BOT = "<human>", "<bot>"
    describes_tools = False  # tools are described in the system message, calls written into the text

    def __init__(self, style: ContextStyle = PLAIN) -> None:
        self.style = style
        self.stop = [f"{self.HUMAN}:"]

    def render(self, turns: list[Turn]) -> str:
        return self.pieces(turns).text

    def pieces(self, turns: list[Turn]) -> PromptPieces:
        return PromptPieces("", [f"{self._lines(turn)}\n" for turn in turns], f"{self.BOT}:")

    def _lines(self, turn: Turn) -> str:
        turn = as_text_turn(turn)
        if turn.role == "system":
            return turn.content
        speaker = self.HUMAN if turn.role == "user" else self.BOT
        line = f"{speaker}: {turn.content}"
        if turn.context:
            instruction = self.style.heading(CONTEXT_INSTRUCTION)
            return f"{self.HUMAN}: {instruction}\n{context_block(list(turn.context), self.style.numbered)}\n{line}"
        return line


PromptFormat = ChatTemplatePrompt | OpenChatKitPrompt


def prompt_format_for(
    name: str,
    chat_template: str,
    bos_token: str,
    eos_token: str,
    style: ContextStyle = PLAIN,
    tool_use: ToolUse | None = None,
) -> PromptFormat:
    if name == "chat_template" and chat_template:
        return ChatTemplatePrompt(chat_template, bos_token, eos_token, style, tool_use)
    if name == "openchatkit":
        return OpenChatKitPrompt(style)
    raise FailedPrecondition(f"the generation service reports prompt format {name!r}, which the orchestrator lacks")


def _tool_message(turn: Turn, style: ContextStyle) -> dict:
    """A turn in OpenAI's message shape, for a template that renders tool calls and results itself."""
    message: dict = {"role": turn.role, "content": _content(turn, style)}
    if turn.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": parsed_arguments(call.arguments, "arguments")},
            }
            for call in turn.tool_calls
        ]
    if turn.role == "tool":
        message["tool_call_id"] = turn.tool_call_id
        if turn.name:
            message["name"] = turn.name
    return message


def _content(turn: Turn, style: ContextStyle) -> str:
    if not turn.context:
        return turn.content
    return f"{turn.content}\n\n{style.heading(CONTEXT_HEADING)}\n{context_block(list(turn.context), style.numbered)}"


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)
