"""The OpenAI request bodies `stip proxy` accepts: an explicit allow-list; any other field is refused by name.

A parameter the proxy cannot honour is never silently ignored (a client asking for JSON mode or tools would get an
answer that looks right and is not). Known OpenAI parameters without support are listed in UNSUPPORTED with the
reason the 400 gives; a field nobody knows gets a 400 too. Sent as null (or an empty list or object, or a value in
NEUTRAL), a listed parameter means "not used" and is accepted, since some clients send every field.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stip.common.sampling import MAX_TOP_LOGPROBS, SamplingParams

MAX_N = 16  # choices per request; each is its own server session
MAX_PROMPTS = 2048  # prompts in one /v1/completions batch (each prompt x n choices is a server session)
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy completions endpoint
CHAT_DEFAULT_MAX_TOKENS = 256

UNSUPPORTED = {
    # chat completions declare tools, tool_choice and parallel_tool_calls (`proxy_tools`); elsewhere these refuse them
    "tools": "tool calling is offered by /v1/chat/completions only",
    "tool_choice": "tool calling is offered by /v1/chat/completions only",
    "parallel_tool_calls": "tool calling is offered by /v1/chat/completions only",
    "functions": "the deprecated function calling is not supported: use tools",
    "function_call": "the deprecated function calling is not supported: use tools and tool_choice",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this model has no reasoning settings",
    "verbosity": "verbosity is not supported",
    "web_search_options": "web search is not supported",
    "service_tier": "service tiers are not supported",
    "prompt_cache_key": "prompt caching is not supported",
    "safety_identifier": "safety identifiers are not supported",
    "suffix": "insertion (suffix) is not supported",
    "best_of": "best_of is not supported (use n)",
    # /v1/responses (text in, text out: no stored state, tools or reasoning)
    "previous_response_id": "the proxy stores no responses: send the whole conversation as input",
    "conversation": "the proxy stores no conversations: send the whole conversation as input",
    "include": "no extra output items are offered",
    "reasoning": "this model has no reasoning settings",
    "background": "background responses are not supported",
    "max_tool_calls": "tool calling is offered by /v1/chat/completions only",
    "truncation": "input is never truncated (only 'disabled' is accepted)",
    # fields of a chat message
    "refusal": "refusal messages are not supported",
}
NEUTRAL = {"tool_choice": ("none",), "best_of": (1,), "suffix": ("",), "modalities": (["text"],),
           "background": (False,), "truncation": ("disabled",)}


def _drop_neutral(data: Any, declared=()) -> Any:
    """Remove listed-but-unsupported fields that were sent with a value meaning "not used" (a field the model
    `declared` is its own: chat's tool_choice "none" means what it says)."""
    if not isinstance(data, dict):
        return data
    return {k: v for k, v in data.items() if k in declared or
            not (k in UNSUPPORTED and (v is None or v == [] or v == {} or v in NEUTRAL.get(k, ())))}


class ApiError(Exception):
    """An error the HTTP client gets as OpenAI's error body, with this status: `kind` is its `type`, `code` its
    machine-readable `code` ("context_length_exceeded", "model_not_found", ...), as OpenAI names them."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, *,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _neutral(cls, data: Any) -> Any:
        return _drop_neutral(data, cls.model_fields)


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool = False  # accepted; there is nothing to obfuscate on loopback


class _Common(_Strict):
    model: str = "stip"
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    user: Optional[str] = None  # accepted, not used (there is no abuse monitoring to tag)
    top_k: int = Field(0, ge=0)  # extensions, as vLLM takes them (extra_body)
    repetition_penalty: float = Field(1.0, gt=0.0)
    logit_bias: Optional[dict[str, float]] = None  # token id (as a string, as JSON keys are) -> bias in [-100, 100]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_tokens: Optional[int], logprobs: Optional[int], grammar: Optional[str] = None
                 ) -> list[SamplingParams]:
        """One SamplingParams per choice: with a seed, choice i draws with seed + i. `grammar`: the output's
        (function calls); else the request's own (`grammar()`)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])  # any number, as vLLM takes
        try:
            return self._sampling(max_tokens, logprobs, stop, grammar or self.grammar())
        except ValueError as e:
            raise ApiError(400, str(e), None, "invalid_value") from None

    def _sampling(self, max_tokens, logprobs, stop, grammar) -> list[SamplingParams]:
        return [SamplingParams(max_tokens=max_tokens or CHAT_DEFAULT_MAX_TOKENS,
                               temperature=1.0 if self.temperature is None else self.temperature,
                               top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k,
                               repetition_penalty=self.repetition_penalty,
                               presence_penalty=self.presence_penalty or 0.0,
                               frequency_penalty=self.frequency_penalty or 0.0,
                               seed=None if self.seed is None else self.seed + i, stop=stop, logprobs=logprobs,
                               logit_bias=self._logit_bias(), grammar=grammar)
                for i in range(self.n)]

    def _logit_bias(self) -> dict[int, float]:
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise ValueError(f"logit_bias keys are token ids, not {key[:40]!r}")
            bias[int(key)] = value
        return bias

    def grammar(self) -> Optional[str]:
        """The llguidance grammar the output must match (response_format); None: free text."""
        return None


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(max_length=64)
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None  # the output always matches the schema: constrained decoding


class ResponseFormat(_Strict):
    """OpenAI's response_format: text (the default), json_object (JSON mode) or json_schema."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only with it")
        return self


TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionDef(_Strict):
    name: str = Field(pattern=TOOL_NAME)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema of the arguments (an object); none: no arguments
    strict: Optional[bool] = None  # the arguments always match: constrained decoding


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class ToolChoiceFunction(_Strict):
    type: Literal["function"]
    function: FunctionName


class CalledFunction(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None  # accepted, not passed to the chat template
    tool_calls: Optional[list[ToolCall]] = None  # an assistant's earlier calls
    tool_call_id: Optional[str] = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls belong to assistant messages")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message needs tool_call_id (the call it answers), and only a tool message has one")
        return self


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    metadata: Optional[dict[str, str]] = None  # accepted, not used: the proxy stores nothing
    store: Optional[bool] = None  # accepted: the proxy stores nothing either way
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Tool]] = None  # function calling: `stip.client.proxy_tools`
    tool_choice: Optional[Union[Literal["none", "auto", "required"], ToolChoiceFunction]] = None
    parallel_tool_calls: Optional[bool] = None  # accepted: a choice makes at most one call, which either allows

    def grammar(self) -> Optional[str]:
        """response_format's grammar; tools that may be called bring their own (`proxy_tools.ToolUse`)."""
        from stip.client.constrained import json_grammar

        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        return json_grammar(fmt.json_schema.schema_ or {} if fmt.type == "json_schema" else None)

    @property
    def top(self) -> Optional[int]:
        """Alternatives per token, or None when logprobs are off."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]  # one prompt, or a batch (`prompts()`)
    max_tokens: Optional[int] = Field(16, ge=0)  # the OpenAI default for completions; 0: score the echoed prompt
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    @property
    def top(self) -> Optional[int]:
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(400, "max_tokens=0 generates nothing: it needs echo=true", "max_tokens")
        if self.stream and self.echo and (self.logprobs is not None or self.max_tokens == 0):
            raise ApiError(400, "logprobs of the echoed prompt (and max_tokens=0) are not streamed: use "
                                "stream=false", "stream")
        return self.logprobs

    def prompts(self) -> list[Union[str, list[int]]]:
        """The batch: each prompt a string or token ids (a list of ints is one prompt, as OpenAI and vLLM read it)."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
            return [prompt]
        if not prompt:
            raise ApiError(400, "prompt is empty: send a string, a list of strings, token ids or lists of token ids",
                           "prompt", "invalid_value")
        if len(prompt) > MAX_PROMPTS:
            raise ApiError(400, f"{len(prompt)} prompts in one request; at most {MAX_PROMPTS}", "prompt",
                           "invalid_value")
        return list(prompt)


def message_text(m: ChatMessage) -> dict:
    """A chat message as the chat template takes it (text parts joined); a message with image parts keeps its parts
    (text and image_url only), which `stip.client.vision.extract_images` turns into image tokens and images."""
    content = m.content
    if isinstance(content, list):
        parts = []
        for p in content:
            if p.get("type") == "image_url":
                return {"role": "system" if m.role == "developer" else m.role, "content": content}
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ApiError(400, f"message content part of type {p.get('type')!r} is not supported (text and "
                                    "image_url only)", "messages", "unsupported_value")
            parts.append(p["text"])
        content = "".join(parts)
    role = "system" if m.role == "developer" else m.role
    return {"role": role, "content": content or ""}


def is_json(content_type: str | None) -> bool:
    """What FastAPI parses as a JSON body: application/json, or any application/*+json, parameters aside."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def validation_error(errors: list[dict], content_type: str | None = "application/json") -> ApiError:
    """A body that failed validation, as a 400 naming the `param`: every unknown or unsupported field at once, else
    the first invalid value. A body that is not sent as JSON is never read as one, so that is what the 400 says."""
    if not is_json(content_type):
        return ApiError(400, f"the request body must be JSON sent with the header `Content-Type: application/json` "
                             f"(this request's: {repr(content_type[:100]) if content_type else 'none'})", None,
                        "invalid_content_type")
    def where(loc) -> str:
        out = ""
        for x in loc:
            if x == "body":
                continue
            out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
        return out

    extra = [e for e in errors if e.get("type") == "extra_forbidden"]
    if extra:
        names = [where(e["loc"]) for e in extra]
        parts = []
        for name in names:
            field = name.rsplit(".", 1)[-1]
            parts.append(f"{name} ({UNSUPPORTED[field]})" if field in UNSUPPORTED else f"{name} (unknown parameter)")
        code = "unsupported_parameter" if names[0].rsplit(".", 1)[-1] in UNSUPPORTED else "unknown_parameter"
        return ApiError(400, f"unsupported parameter{'s' if len(parts) > 1 else ''}: {', '.join(parts)}", names[0],
                        code)
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON")
    name = where(first.get("loc", ()))
    why = str(first.get("msg", "invalid request")).removeprefix("Value error, ")  # a validator's own message
    return ApiError(400, f"{name or 'request'}: {why}", name or None,
                    "missing_required_parameter" if first.get("type") == "missing" else "invalid_value")
