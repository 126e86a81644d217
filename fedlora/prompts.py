"""How an example becomes token ids: the base's own chat template, or fedlora's built-in format.

An adapter learns the format it is trained in, and a model is served with its chat template, so
when the base tokenizer has one, training, evaluation and `fedlora generate` all format with it;
the built-in "### Record / ### Question / ### Answer" format is for bases without one (the tiny
Llama). Both formats go through `segments`, so what a site trains on and what `fedlora generate`
asks are the same tokens, and every assistant turn of a conversation is trained on (its
end-of-turn marker included), never the system, user or template text around it.

A conversation is rendered turn by turn: the text an assistant turn adds is what the template
renders with the turn minus what it renders up to its generation prompt. This needs a template
that renders earlier turns the same once later turns follow; one that does not is refused with
the reason, never silently trained on a different text than it serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedlora.data import Example

CHAT_TEMPLATE = "chat-template"
BUILTIN = "builtin"
SETTINGS = ("auto", CHAT_TEMPLATE, BUILTIN)
ASSISTANT = "assistant"

Turn = tuple[str, str]  # (role, content)
Segment = tuple[list[int], bool]  # token ids, and whether the loss covers them


@dataclass(frozen=True)
class PromptFormat:
    """The format a run trains and answers in; a version's manifest records it (`fedlora generate` reads it)."""

    name: str = BUILTIN
    system_prompt: str = ""


def resolve_prompt_format(setting: str, system_prompt: str, tokenizer: Any, model_name: str) -> PromptFormat:
    """model.prompt_format -> the format used: 'auto' is the base's chat template when its tokenizer has one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting == CHAT_TEMPLATE and not has_template:
        raise ValueError(
            f"model.prompt_format='chat-template', but the tokenizer of {model_name!r} has no chat template "
            "(tokenizer_config.json 'chat_template' or chat_template.jinja); use 'auto' or 'builtin'"
        )
    if setting not in SETTINGS:
        raise ValueError(f"model.prompt_format: {setting!r} is not one of {', '.join(SETTINGS)}")
    name = CHAT_TEMPLATE if setting == CHAT_TEMPLATE or (setting == "auto" and has_template) else BUILTIN
    return PromptFormat(name, system_prompt)


def format_from_facts(facts: dict[str, Any]) -> PromptFormat:
    """The format a signed version was trained in (versions from before formats were recorded: built-in)."""
    recorded = facts.get("prompt_format") or {}
    return PromptFormat(recorded.get("name", BUILTIN), recorded.get("system_prompt", ""))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _with_system(turns: list[Turn], system_prompt: str) -> list[Turn]:
    """The configured system prompt first, unless the conversation brings its own."""
    if system_prompt and not (turns and turns[0][0] == "system"):
        return [("system", system_prompt), *turns]
    return turns


def _builtin_segments(example: Example, tokenizer: Any, system_prompt: str, answered: bool) -> list[Segment]:
    """BOS, earlier turns as '### role' blocks (assistant content trained), the task's prompt, the answer and EOS."""
    pieces: list[Segment] = [([tokenizer.bos_token_id], False)] if tokenizer.bos_token_id is not None else []
    for role, content in _with_system(list(example.history), system_prompt if example.history else ""):
        if role == ASSISTANT:
            pieces += [(_ids(tokenizer, f"### {role}\n"), False), (_ids(tokenizer, content), True), (_ids(tokenizer, "\n"), False)]
        else:
            pieces.append((_ids(tokenizer, f"### {role}\n{content}\n"), False))
    prompt = example.prompt
    if system_prompt and not example.history and not prompt.startswith("### system\n"):
        prompt = f"### system\n{system_prompt}\n{prompt}"
    pieces.append((_ids(tokenizer, prompt), False))
    if answered:
        pieces.append((_ids(tokenizer, example.response) + [tokenizer.eos_token_id], True))
    return pieces


def _render(tokenizer: Any, turns: list[Turn], generation_prompt: bool) -> str:
    messages = [{"role": role, "content": content} for role, content in turns]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _template_segments(example: Example, tokenizer: Any, system_prompt: str, answered: bool) -> list[Segment]:
    """The template's text cut at each assistant turn: the turn's own text (with its end-of-turn marker) is trained."""
    request = list(example.request) or [("user", example.prompt)]
    turns = _with_system([*example.history, *request], system_prompt)
    if answered:
        turns.append((ASSISTANT, example.response))
    pieces: list[Segment] = []
    done = ""
    for index, (role, _) in enumerate(turns):
        if role != ASSISTANT:
            continue
        asked = _render(tokenizer, turns[:index], generation_prompt=True)
        said = _render(tokenizer, turns[: index + 1], generation_prompt=False)
        if not (asked.startswith(done) and said.startswith(asked)):
            raise ValueError(
                "the base's chat template renders a conversation differently once later turns follow, so its assistant "
                "turns cannot be cut out for training; set model.prompt_format='builtin'"
            )
        pieces += [(_ids(tokenizer, asked[len(done) :]), False), (_ids(tokenizer, said[len(asked) :]), True)]
        done = said
    if not answered:
        asked = _render(tokenizer, turns, generation_prompt=True)
        pieces.append((_ids(tokenizer, asked[len(done) :]), False))
    return pieces


def segments(example: Example, tokenizer: Any, prompt_format: PromptFormat, answered: bool = True) -> list[Segment]:
    """The example's token pieces in order; without `answered`, up to where the model starts answering."""
    build = _template_segments if prompt_format.name == CHAT_TEMPLATE else _builtin_segments
    return build(example, tokenizer, prompt_format.system_prompt, answered)


def _left_truncated(ids: list[int], labels: list[int], limit: int, bos: int | None) -> tuple[list[int], list[int]]:
    """The last `limit` tokens, keeping a leading BOS: the answer, at the end, stays whole."""
    if len(ids) <= limit:
        return ids, labels
    keep = 1 if bos is not None and ids[:1] == [bos] else 0
    return ids[:keep] + ids[len(ids) - limit + keep :], labels[:keep] + labels[len(ids) - limit + keep :]


def encode_example(example: Example, tokenizer: Any, prompt_format: PromptFormat, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels, -100 everywhere but the assistant turns, so the loss covers only answers."""
    ids: list[int] = []
    labels: list[int] = []
    for piece, trained in segments(example, tokenizer, prompt_format):
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    return _left_truncated(ids, labels, max_length, tokenizer.bos_token_id)


def encode_request(example: Example, tokenizer: Any, prompt_format: PromptFormat, room: int) -> list[int]:
    """The ids a model answers from (at most `room`): training's tokens up to the answer."""
    ids = [token for piece, _ in segments(example, tokenizer, prompt_format, answered=False) for token in piece]
    return _left_truncated(ids, ids, max(room, 2), tokenizer.bos_token_id)[0]
