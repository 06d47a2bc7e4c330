"""Function calling in `stip proxy`'s chat completions: OpenAI's `tools` and `tool_choice`, by constrained decoding
on this machine (the same llguidance path as `response_format`; the server sees nothing of it).

A call is generated as one JSON object, `{"name": "<tool>", "arguments": <that tool's arguments>}`, exactly so
spaced (the grammar fixes the text around the arguments; the arguments follow the tool's `parameters` schema, with
", " and ": " between items and no other whitespace).
`tool_choice`: "required" allows a call of any tool, `{"type": "function", "function": {"name": N}}` a call of N,
"none" no call (the tools are then not shown to the model), and "auto" (the default with tools) a call or plain text,
decided by the first character: `{` starts a call, which must then be complete and valid; anything else is text.
One call per choice (`parallel_tool_calls` is accepted: at most one call satisfies true and false).

The model sees the tools through its chat template where the template takes `tools` (transformers'
apply_chat_template(tools=...)); otherwise through a short system instruction that lists them and the call's form.
Earlier calls and tool results in the history go through the template's own tool format, or, for a template without
one, as the call's JSON in the assistant's message and the result in a user message.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Optional

from stip.client.proxy_requests import ApiError, ChatMessage, message_text
from stip.client.proxy_responses import ChatFormat

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
# the arguments' JSON with fixed separators and no other whitespace: a model cannot pad a call with spaces until
# max_tokens (as it may where JSON whitespace is free), and the text is what OpenAI's looks like
COMPACT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
FREE_TEXT = r"TEXT: /[^{\s](.|\n)*/"  # "auto": text is anything that does not start with "{" (or a space)


def call_prefix(name: str) -> str:
    """The text a call of `name` starts with; its arguments follow, then "}". (Names are [a-zA-Z0-9_-].)"""
    return f'{{"name": "{name}", "arguments": '


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class Call:
    name: str
    arguments: str  # JSON text as generated (partial when the generation was cut)
    complete: bool


class ToolUse:
    """What one request's `tools` and `tool_choice` ask: the tools the model may call, and whether it may answer in
    text instead."""

    def __init__(self, tools, choice, response_format=None):
        self.tools = {}
        for t in tools or ():
            if t.function.name in self.tools:
                raise ApiError(400, f"two tools are named {t.function.name!r}", "tools", "invalid_value")
            self.tools[t.function.name] = t.function
        if choice is None:
            choice = "auto" if self.tools else "none"
        if choice != "none" and not self.tools:
            raise ApiError(400, "tool_choice needs tools: there is nothing to call", "tool_choice", "invalid_value")
        if isinstance(choice, str):
            self.callable = [] if choice == "none" else list(self.tools)
        else:
            name = choice.function.name
            if name not in self.tools:
                raise ApiError(400, f"tool_choice names the function {name[:64]!r}, which is not among the tools",
                               "tool_choice", "invalid_value")
            self.callable = [name]
        self.free_text = choice == "auto"
        self.choice = choice
        if self.callable and response_format is not None and response_format.type != "text":
            raise ApiError(400, "response_format json_object or json_schema cannot be combined with tools the model "
                                "may call (tool_choice 'auto', 'required' or a function): use tool_choice 'none'",
                           "response_format", "invalid_value")

    @property
    def active(self) -> bool:
        """The output may be a call (tool_choice other than "none")."""
        return bool(self.callable)

    def grammar(self) -> str:
        """The llguidance (Lark) grammar of the output: one call of a callable tool, or (auto) plain text."""
        from llguidance import LLMatcher

        alternatives, rules = [], []
        for i, name in enumerate(self.callable):
            params = {"x-guidance": COMPACT, **(self.tools[name].parameters or NO_ARGUMENTS)}
            alternatives.append(f"call_{i}")
            rules += [f'call_{i}: {json.dumps(call_prefix(name))} args_{i} "}}"', f"args_{i}: %json {json.dumps(params)}"]
        if self.free_text:
            alternatives.append("TEXT")
            rules.append(FREE_TEXT)
        return LLMatcher.grammar_from_lark("\n".join([f"start: {' | '.join(alternatives)}", *rules]))

    def template_tools(self) -> list[dict]:
        """The tools as transformers' chat templates take them (OpenAI's form)."""
        return [{"type": "function", "function": {k: v for k, v in
                                                  (("name", f.name), ("description", f.description),
                                                   ("parameters", f.parameters or NO_ARGUMENTS)) if v is not None}}
                for name, f in self.tools.items() if name in self.callable]

    def instruction(self) -> str:
        """The system instruction for a chat template without a tool format."""
        listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in self.template_tools())
        how = ("If no function is needed, answer in plain text instead." if self.free_text else
               f"Call the function {self.callable[0]}." if not isinstance(self.choice, str) else
               "Reply with a function call.")
        return (f"You can call these functions:\n{listed}\nTo call a function, reply with only a JSON object "
                f'{{"name": <the function\'s name>, "arguments": <its arguments as a JSON object>}}. {how}')

    def parse(self, text: str) -> Optional[Call]:
        """The call in a generated text, or None for plain text (or a call cut before its name was complete)."""
        for name in self.callable:
            prefix = call_prefix(name)
            if text.startswith(prefix):
                rest = text[len(prefix):]
                if rest.endswith("}"):
                    try:
                        json.loads(rest[:-1])
                        return Call(name, rest[:-1], True)
                    except ValueError:
                        pass
                return Call(name, rest, False)
        return None


def takes_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template has a tool format (it reads a `tools` variable)."""
    import jinja2.meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    if not isinstance(template, str):
        return False
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(ImmutableSandboxedEnvironment().parse(template))
    except jinja2.TemplateError:
        return False


def chat_messages(messages: list[ChatMessage], tools: ToolUse, native: bool) -> tuple[list[dict], list | None]:
    """(the messages as the chat template takes them, the `tools` to pass it). `native`: the template has a tool
    format; otherwise the callable tools are described in a system instruction and the tool history is text."""
    names = {c.id: c.function.name for m in messages for c in m.tool_calls or ()}
    out = []
    for m in messages:
        d = message_text(m)
        if m.tool_calls and native:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                               for c in m.tool_calls]
        elif m.tool_calls:
            calls = "\n".join(call_prefix(c.function.name) + c.function.arguments + "}" for c in m.tool_calls)
            d["content"] = f"{d['content']}\n{calls}" if d["content"] else calls
        if m.role == "tool" and native:
            d.update(tool_call_id=m.tool_call_id, name=names.get(m.tool_call_id, ""))
        elif m.role == "tool":
            d = {"role": "user", "content": f"Result of {names.get(m.tool_call_id, 'the function')} "
                                            f"(call {m.tool_call_id}): {d['content']}"}
        out.append(d)
    if not tools.active:
        return out, None
    if native:
        return out, tools.template_tools()
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{tools.instruction()}"}
    else:
        out.insert(0, {"role": "system", "content": tools.instruction()})
    return out, None


def _arguments(text: str):
    """A call's arguments as templates expect them (an object); text that is not JSON stays text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class ToolChatFormat(ChatFormat):
    """Chat bodies whose choices may be calls: `message.tool_calls` and finish_reason "tool_calls", whole or
    streamed as OpenAI streams them (a first delta with the call's id and name, then its arguments in pieces)."""

    def __init__(self, base: dict, text, top, tools: ToolUse):
        super().__init__(base, text, top)
        self.tools = tools
        self.streams: dict[int, _CallStream] = {}
        self.held: dict[int, list] = {}  # per choice: logprobs of text not yet sent

    def full(self, gens: list, eos: set[int]) -> dict:
        out = super().full(gens, eos)
        for choice, g in zip(out["choices"], gens):
            call = self.tools.parse(g.text)
            if call is not None:
                choice["message"].update(content=None, tool_calls=[_call(call, call_id())])
                if call.complete:
                    choice["finish_reason"] = "tool_calls"
        return out

    def piece(self, i: int, text: str, lps) -> dict | None:
        self.held.setdefault(i, []).extend(lps)
        delta = self.streams.setdefault(i, _CallStream(self.tools)).feed(text)
        if not delta:
            return None
        return self.chunk(i, delta, lps=self.held.pop(i))

    def last(self, i: int, finish: str, lps) -> list[dict]:
        stream = self.streams.setdefault(i, _CallStream(self.tools))
        delta, call = stream.finish()
        lps = self.held.pop(i, []) + list(lps)
        finish = "tool_calls" if call is not None and call.complete else finish
        if not delta:
            return [self.chunk(i, {}, finish, lps)]
        return [self.chunk(i, delta, lps=lps), self.chunk(i, {}, finish)]


def _call(call: Call, id_: str | None, arguments: str | None = None) -> dict:
    """A tool_calls entry: whole (`id_` given), or a streamed piece of its arguments (`id_` None)."""
    args = call.arguments if arguments is None else arguments
    if id_ is None:
        return {"index": 0, "function": {"arguments": args}}
    return {"index": 0, "id": id_, "type": "function", "function": {"name": call.name, "arguments": args}}


class _CallStream:
    """One streamed choice: text deltas in, OpenAI deltas out. Text until the first character shows a call; then
    nothing until the call's name is complete, then the name and id, then the arguments as they come (holding back a
    final "}", which may be the call's own)."""

    def __init__(self, tools: ToolUse):
        self.tools, self.text, self.call, self.sent = tools, "", None, 0
        self.is_call: bool | None = None if tools.active else False

    def feed(self, delta: str) -> dict:
        self.text += delta
        if self.is_call is None and self.text:
            self.is_call = self.text.startswith("{")
        if self.is_call is False:
            out, self.text = self.text, ""
            return {"content": out} if out else {}
        if not self.is_call:
            return {}
        call = self.tools.parse(self.text)
        if call is None:
            return {}
        args = call.arguments[:-1] if call.arguments.endswith("}") else call.arguments
        return self._delta(call, args)

    def _delta(self, call: Call, args: str) -> dict:
        new, self.sent = args[self.sent:], max(self.sent, len(args))
        if self.call is None:
            self.call = call
            return {"tool_calls": [_call(call, call_id(), new)]}
        return {"tool_calls": [_call(call, None, new)]} if new else {}

    def finish(self) -> tuple[dict, Call | None]:
        """The last delta (what was held back) and the call, if any."""
        if not self.is_call:
            return self.feed(""), None
        call = self.tools.parse(self.text)
        if call is None:  # cut inside the call's name: what there is, as text
            return ({"content": self.text} if self.text else {}), None
        return self._delta(call, call.arguments), call
