"""What a protected model is for, in Hugging Face pipeline task names; shared by all three parties.

Decoder tasks run as sessions (a KV cache on the server, one step per token: `/v1/session`, `/v1/generate`); the
others are one-shot requests (`/v1/encode`): the server keeps nothing between them.
"""

TEXT_GENERATION = "text-generation"
IMAGE_TEXT_TO_TEXT = "image-text-to-text"  # LLaVA: the client embeds the image; the server runs a decoder session
FEATURE_EXTRACTION = "feature-extraction"  # encoder hidden states (sentence embeddings are pooled by the client)
TEXT_CLASSIFICATION = "text-classification"
FILL_MASK = "fill-mask"
IMAGE_CLASSIFICATION = "image-classification"

SESSION_TASKS = (TEXT_GENERATION, IMAGE_TEXT_TO_TEXT)
ONE_SHOT_TASKS = (FEATURE_EXTRACTION, TEXT_CLASSIFICATION, FILL_MASK, IMAGE_CLASSIFICATION)
TASKS = SESSION_TASKS + ONE_SHOT_TASKS
