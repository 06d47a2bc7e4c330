"""Where each file of a protected model lives: `DIR/{server,client,developer}/...`. Shared by the party that
writes the bundles (the developer) and the parties that read them, so neither imports the other's code."""

SERVER_DIR, CLIENT_DIR, DEVELOPER_DIR = "server", "client", "developer"
CLIENT_KEY_FILE = "client.stipkey"
DEVELOPER_KEY_FILE = "developer.stipkey"
EMBEDDING_FILE = "embedding-{}.safetensors"  # one file per client tensor: "token", "position"
HEAD_FILE = "head.safetensors"  # --head client: the LM head ("weight", float16 [V, d]), as the server would hold it
CLIENT_MODULE_DIR = "module"  # shards of a client-side module's tensors (BERT embeddings, ViT patches, vision tower)
MODEL_CONFIG_FILE = "model_config.json"  # the model's transformers config (shapes only), to build that module
CLIENT_CONFIG_FILE = "stip_client.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# Where the LM head is (`stip protect --head`): in the server bundle (the default), or only in the client bundle, the
# server then returning the final hidden state (docs/head-client.md). Recorded in every manifest as "head".
HEAD_SERVER, HEAD_CLIENT = "server", "client"
HEADS = (HEAD_SERVER, HEAD_CLIENT)
