"""The proxy's text endpoints: OpenAI's `POST /v1/chat/completions` and `POST /v1/completions`, for a decoder bundle.

Each request is checked here (the bundle generates, the prompt and max_tokens fit the context window, the top-k
downlink carries the logprobs asked for), tokenized on this machine (chat: the bundle's template, image parts for
LLaVA), run as `n` generations per prompt (`proxy_generation`; completions take a batch of prompts, text or token ids)
and answered whole (`proxy_responses`) or streamed (`proxy_sse`). `TextEndpoints` serves `/v1/responses` too
(`proxy_responses_api`).
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from types import SimpleNamespace

from fastapi import APIRouter, Request

from stip.client.image_parts import ImageInputError, check_vision, has_images
from stip.client.proxy_generation import Generations, upstream_error
from stip.client.proxy_requests import CHAT_DEFAULT_MAX_TOKENS, ApiError, ChatRequest, CompletionRequest
from stip.client.proxy_responses import ChatFormat, CompletionFormat, TokenText
from stip.client.proxy_sse import sse_response
from stip.client.proxy_tools import ToolChatFormat, ToolUse, chat_messages, takes_tools
from stip.common.tasks import FEATURE_EXTRACTION, SESSION_TASKS
from stip.errors import StipError


class TextEndpoints:
    """The checks and handlers chat, completions and responses share, for one client (one proxy app)."""

    def __init__(self, client, model_name: str):
        self.client = client
        self.model_name = model_name
        self.eos = set(client.bundle.eos_token_ids)
        self.token_text = TokenText(client.bundle)

    @functools.cached_property
    def template_takes_tools(self) -> bool:
        return self.client.bundle.has_tokenizer and takes_tools(self.client.tokenizer)

    def check_generates(self) -> None:
        """Chat and completions need a decoder bundle; an encoder's proxy says which endpoint it has instead."""
        task = self.client.bundle.task
        if task not in SESSION_TASKS:
            use = "use /v1/embeddings" if task == FEATURE_EXTRACTION else "the proxy has no OpenAI endpoint for it"
            raise ApiError(400, f"this proxy serves a {task} model ({self.model_name}), which does not generate text: "
                                f"{use}")

    def fit(self, ids: list[int], max_tokens: int | None, param: str, what: str = "prompt") -> int:
        """The tokens to generate for this prompt. The prompt and `max_tokens` must fit the context window (the
        model's positions, the server's cap), else a 400 up front, as vLLM refuses, rather than an answer quietly cut
        to finish_reason "length". `max_tokens` None (chat without one): the default, cut to the room left."""
        window = getattr(self.client, "max_positions", 0)
        asked = CHAT_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if not window:
            return asked
        if max_tokens is None and len(ids) >= window:
            raise ApiError(400, f"This model's maximum context length is {window} tokens. However, your {what} has "
                                f"{len(ids)} tokens. Please reduce the length of the {what}.", param,
                           "context_length_exceeded")
        if max_tokens is not None and len(ids) + max_tokens > window:
            raise ApiError(400, f"This model's maximum context length is {window} tokens. However, you requested "
                                f"{len(ids) + max_tokens} tokens ({len(ids)} in the {what}, {max_tokens} in the "
                                f"completion). Please reduce the length of the {what} or completion.", param,
                           "context_length_exceeded")
        return min(asked, window - len(ids))

    def check_top(self, top: int | None, param: str) -> None:
        dl = self.client.downlink
        if top is not None and dl.kind == "topk" and top > dl.k:
            raise ApiError(400, f"{param}={top}, but this proxy's top-k downlink carries {dl.k} tokens per step "
                                f"(run the proxy with a larger --k or --downlink logits)", param)

    def generations(self, prompts: list, params: list, image_features=None) -> Generations:
        """`prompts`: token ids shared by all choices, or one list of them per choice."""
        try:
            return Generations(self.client, prompts, params, image_features)
        except ValueError as e:
            raise ApiError(400, str(e), None, "invalid_value") from None

    async def respond(self, req, gens: Generations, fmt, request: Request):
        if req.stream:
            return await sse_response(gens, fmt, request, self.eos, req.include_usage)
        return fmt.full(await gens.run(request), self.eos)

    async def chat_ids(self, messages: list[dict], param: str = "messages", tools: list[dict] | None = None
                       ) -> tuple[list[int], object]:
        """The messages' token ids through the chat template, and the image features of their image parts (or
        None). `messages`: as the chat template takes them (`message_text`); `tools`: for a template that takes them
        (`proxy_tools`)."""
        client = self.client
        vision, images = None, []
        if has_images(messages):  # image parts (LLaVA): data URLs only, decoded here; a text-only model refuses them
            try:  # and a light install (no stip[vision]) says which install takes them
                check_vision(client.bundle)
                from stip.client import vision

                messages, images = vision.extract_images(client.bundle, messages)
            except ImageInputError as e:
                raise ApiError(400, str(e), param) from None
        try:
            if tools:  # as Client.encode, with the tools passed to the template
                text = client.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                            add_generation_prompt=True)
                ids = client.encode(ids=client.tokenizer(text, add_special_tokens=False)["input_ids"])
            else:
                ids = client.encode(messages=messages)
        except Exception as e:  # a template that rejects the roles, say
            raise ApiError(400, f"could not apply the chat template: {e}", param) from None
        features = None
        if images:  # the vision tower runs once for all choices, off the event loop
            try:
                prepared = await asyncio.to_thread(vision.prepare, client.bundle, ids, images)
            except ImageInputError as e:
                raise ApiError(400, str(e), param) from None
            ids, features = prepared.ids, prepared.features
        return ids, features

    async def chat(self, req: ChatRequest, request: Request):
        self.check_generates()
        top = req.top
        self.check_top(top, "top_logprobs")
        tools = ToolUse(req.tools, req.tool_choice, req.response_format)
        messages, template_tools = chat_messages(req.messages, tools, self.template_takes_tools)
        ids, features = await self.chat_ids(messages, tools=template_tools)
        params = req.sampling(self.fit(ids, req.max_completion_tokens or req.max_tokens, "messages", "messages"), top,
                              tools.grammar() if tools.active else None)
        gens = self.generations(ids, params, features)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": req.model or self.model_name}
        fmt = ToolChatFormat(base, self.token_text, top, tools) if tools.active else \
            ChatFormat(base, self.token_text, top)
        return await self.respond(req, gens, fmt, request)

    def prompt_ids(self, prompt: str | list[int], what: str = "prompt") -> list[int]:
        """One prompt's token ids (a string through the tokenizer; ids checked against the vocabulary). `what`: the
        prompt's name in a batch (prompt[i]), which the 400 gives."""
        client = self.client
        where = "" if what == "prompt" else f"{what}: "
        try:
            ids = client.encode(ids=prompt) if isinstance(prompt, list) else client.encode(prompt=prompt)
        except (ValueError, StipError) as e:
            raise ApiError(400, f"{where}{e}", "prompt", "invalid_value") from None
        if isinstance(prompt, list) and (min(ids) < 0 or max(ids) >= client.bundle.vocab_size):
            raise ApiError(400, f"{where}token ids must be in [0, {client.bundle.vocab_size})", "prompt",
                           "invalid_value")
        return ids

    async def complete(self, req: CompletionRequest, request: Request):
        """One prompt or a batch: choice i*n + j is prompt i's j-th, all run concurrently (`Generations`)."""
        self.check_generates()
        top = req.top
        self.check_top(top, "logprobs")
        prompts = req.prompts()
        batch = len(prompts) > 1
        ids = []
        for i, prompt in enumerate(prompts):
            what = f"prompt[{i}]" if batch else "prompt"
            ids.append(self.prompt_ids(prompt, what))
            self.fit(ids[-1], req.max_tokens, "prompt", what)
        echo = [self.echo_text(p, x) if req.echo else "" for p, x in zip(prompts, ids)]
        scored = await self.score_prompts(ids, top) if req.echo and top is not None else None
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model or self.model_name}
        fmt = CompletionFormat(base, self.token_text, top, echo, req.n, scored)
        if req.max_tokens == 0:  # the echoed prompt (and its logprobs) only: nothing to generate
            return fmt.full([nothing_generated(x) for x in ids for _ in range(req.n)], self.eos)
        params = [p for _ in prompts for p in req.sampling(req.max_tokens, top)]
        gens = self.generations([x for x in ids for _ in range(req.n)], params)
        return await self.respond(req, gens, fmt, request)

    def echo_text(self, prompt, ids: list[int]) -> str:
        """The echoed prompt: as sent, or decoded; a bundle without a tokenizer shows its tokens as `token_id:N`, as
        its logprobs do."""
        if isinstance(prompt, str):
            return prompt
        if not self.client.bundle.has_tokenizer:
            return "".join(self.token_text(t)[0] for t in ids)
        return self.client.tokenizer.decode(ids)

    async def score_prompts(self, ids: list[list[int]], top: int) -> list[tuple[list[int], list]]:
        """Per prompt, (its ids, each token's logprob given those before it: `Client.score`), off the event loop."""
        try:
            scores = await asyncio.gather(*(asyncio.to_thread(self.client.score, ids=x, top=top) for x in ids))
        except ApiError:
            raise
        except Exception as e:
            raise upstream_error(e) from None
        return list(zip(ids, scores))


def nothing_generated(prompt_ids: list[int]) -> SimpleNamespace:
    """What a choice of max_tokens=0 holds: no text, no tokens (finish_reason "length", as vLLM answers)."""
    return SimpleNamespace(text="", finish_reason="length", logprobs=[],
                           usage={"prompt_tokens": len(prompt_ids), "completion_tokens": 0,
                                  "total_tokens": len(prompt_ids)})


def completions_router(endpoints: TextEndpoints) -> APIRouter:
    """`/chat/completions` and `/completions`, to include under the proxy's /v1 router."""
    router = APIRouter()

    @router.post("/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        return await endpoints.chat(req, request)

    @router.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await endpoints.complete(req, request)

    return router
