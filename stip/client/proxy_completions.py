"""The proxy's text endpoints: OpenAI's `POST /v1/chat/completions` and `POST /v1/completions`, for a decoder bundle.

Each request is checked here (the bundle generates, the prompt fits, the top-k downlink carries the logprobs asked
for), tokenized on this machine (chat: the bundle's template, image parts for LLaVA), run as `n` generations
(`proxy_generation`) and answered whole (`proxy_responses`) or streamed (`proxy_sse`).
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request

from stip.client import vision
from stip.client.proxy_generation import Generations
from stip.client.proxy_requests import ApiError, ChatRequest, CompletionRequest, message_text
from stip.client.proxy_responses import ChatFormat, CompletionFormat, TokenText
from stip.client.proxy_sse import sse_response
from stip.common.tasks import FEATURE_EXTRACTION, SESSION_TASKS
from stip.errors import StipError


class TextEndpoints:
    """The checks and handlers chat and completions share, for one client (one proxy app)."""

    def __init__(self, client, model_name: str):
        self.client = client
        self.model_name = model_name
        self.eos = set(client.bundle.eos_token_ids)
        self.token_text = TokenText(client.bundle)

    def check_generates(self) -> None:
        """Chat and completions need a decoder bundle; an encoder's proxy says which endpoint it has instead."""
        task = self.client.bundle.task
        if task not in SESSION_TASKS:
            use = "use /v1/embeddings" if task == FEATURE_EXTRACTION else "the proxy has no OpenAI endpoint for it"
            raise ApiError(400, f"this proxy serves a {task} model ({self.model_name}), which does not generate text: "
                                f"{use}")

    def check_length(self, ids: list[int], param: str) -> None:
        client = self.client
        if client.max_positions and len(ids) > client.max_positions:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this model takes at most "
                                f"{client.max_positions}", param, "context_length_exceeded")

    def check_top(self, top: int | None, param: str) -> None:
        dl = self.client.downlink
        if top is not None and dl.kind == "topk" and top > dl.k:
            raise ApiError(400, f"{param}={top}, but this proxy's top-k downlink carries {dl.k} tokens per step "
                                f"(run the proxy with a larger --k or --downlink logits)", param)

    def generations(self, ids: list[int], params: list, image_features=None) -> Generations:
        try:
            return Generations(self.client, ids, params, image_features)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    async def respond(self, req, gens: Generations, fmt, request: Request):
        if req.stream:
            return await sse_response(gens, fmt, request, self.eos, req.include_usage)
        return fmt.full(await gens.run(request), self.eos)

    async def chat_ids(self, req: ChatRequest) -> tuple[list[int], object]:
        """The messages' token ids through the chat template, and the image features of their image parts (or
        None)."""
        client = self.client
        messages = [message_text(m) for m in req.messages]
        try:  # image parts (LLaVA): data URLs only, decoded here; a text-only model refuses them
            messages, images = vision.extract_images(client.bundle, messages)
        except vision.ImageInputError as e:
            raise ApiError(400, str(e), "messages") from None
        try:
            ids = client.encode(messages=messages)
        except Exception as e:  # a template that rejects the roles, say
            raise ApiError(400, f"could not apply the chat template: {e}", "messages") from None
        features = None
        if images:  # the vision tower runs once for all choices, off the event loop
            try:
                prepared = await asyncio.to_thread(vision.prepare, client.bundle, ids, images)
            except vision.ImageInputError as e:
                raise ApiError(400, str(e), "messages") from None
            ids, features = prepared.ids, prepared.features
        return ids, features

    async def chat(self, req: ChatRequest, request: Request):
        self.check_generates()
        top = req.top
        self.check_top(top, "top_logprobs")
        params = req.sampling(req.max_completion_tokens or req.max_tokens, top)
        ids, features = await self.chat_ids(req)
        self.check_length(ids, "messages")
        gens = self.generations(ids, params, features)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": req.model or self.model_name}
        return await self.respond(req, gens, ChatFormat(base, self.token_text, top), request)

    def prompt_ids(self, req: CompletionRequest) -> tuple[str | list[int], list[int]]:
        """(the prompt, a string or token ids; its token ids): one prompt, ids within the vocabulary."""
        client = self.client
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request (a list of prompts is a batch)", "prompt")
            prompt = prompt[0]
        try:
            ids = client.encode(ids=prompt) if isinstance(prompt, list) else client.encode(prompt=prompt)
        except (ValueError, StipError) as e:
            raise ApiError(400, str(e), "prompt") from None
        if isinstance(prompt, list) and (min(ids) < 0 or max(ids) >= client.bundle.vocab_size):
            raise ApiError(400, f"token ids must be in [0, {client.bundle.vocab_size})", "prompt")
        return prompt, ids

    async def complete(self, req: CompletionRequest, request: Request):
        self.check_generates()
        top = req.top
        self.check_top(top, "logprobs")
        params = req.sampling(req.max_tokens, top)
        prompt, ids = self.prompt_ids(req)
        self.check_length(ids, "prompt")
        echo = (prompt if isinstance(prompt, str) else self.client.tokenizer.decode(ids)) if req.echo else ""
        gens = self.generations(ids, params)
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model or self.model_name}
        return await self.respond(req, gens, CompletionFormat(base, self.token_text, top, echo), request)


def completions_router(client, model_name: str) -> APIRouter:
    """`/chat/completions` and `/completions`, to include under the proxy's /v1 router."""
    endpoints = TextEndpoints(client, model_name)
    router = APIRouter()

    @router.post("/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        return await endpoints.chat(req, request)

    @router.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await endpoints.complete(req, request)

    return router
