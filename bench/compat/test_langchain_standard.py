"""LangChain's standard integration tests (the `langchain-tests` package, the suite every
LangChain chat-model and embeddings integration runs) with `langchain-openai`'s ChatOpenAI
and OpenAIEmbeddings pointed at `corral serve`. Run by bench/compat.py in its own virtual
environment (these packages are not Corral's dependencies); CORRAL_URL, CORRAL_KEY and
CORRAL_MODEL say where the server is."""

from __future__ import annotations

import os

from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from langchain_tests.integration_tests import ChatModelIntegrationTests, EmbeddingsIntegrationTests

URL, KEY, MODEL = os.environ["CORRAL_URL"], os.environ["CORRAL_KEY"], os.environ["CORRAL_MODEL"]


class TestCorralChat(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatOpenAI]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict:
        return {
            "model": MODEL,
            "base_url": URL,
            "api_key": KEY,
            "temperature": 0,
            "max_tokens": 256,
            "timeout": 600,
            "max_retries": 0,
            "stream_usage": True,  # stream_options.include_usage, as for OpenAI itself
        }

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def tool_choice_value(self) -> str:
        return "any"  # LangChain's word for OpenAI's "required"

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": [], "stream": []}


class TestCorralEmbeddings(EmbeddingsIntegrationTests):
    @property
    def embeddings_class(self) -> type[OpenAIEmbeddings]:
        return OpenAIEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        # no client-side token counting: it would fetch OpenAI's tokenizer files
        return {
            "model": MODEL,
            "base_url": URL,
            "api_key": KEY,
            "check_embedding_ctx_length": False,
            "tiktoken_enabled": False,
        }
