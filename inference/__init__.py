"""The inference server (`ftjobs serve`): OpenAI chat completions, completions and classifications on base
models and the artifacts fine-tuned on them, in its own process. The API forwards requests to it; see
`inference.app` (HTTP), `inference.engine` (models in memory) and `inference.generation` (decoding)."""
