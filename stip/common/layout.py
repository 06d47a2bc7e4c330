"""Where each file of a protected model lives: `DIR/{server,client,developer}/...`. Shared by the party that
writes the bundles (the developer) and the parties that read them, so neither imports the other's code."""

SERVER_DIR, CLIENT_DIR, DEVELOPER_DIR = "server", "client", "developer"
CLIENT_KEY_FILE = "client.stipkey"
DEVELOPER_KEY_FILE = "developer.stipkey"
EMBEDDING_FILE = "embedding-{}.safetensors"  # one file per client tensor: "token", "position"
CLIENT_MODULE_DIR = "module"  # shards of a client-side module's tensors (BERT embeddings, ViT patches, vision tower)
MODEL_CONFIG_FILE = "model_config.json"  # the model's transformers config (shapes only), to build that module
CLIENT_CONFIG_FILE = "stip_client.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
