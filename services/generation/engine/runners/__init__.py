"""What runs the model under the engine (``engine/runner.py``'s ``Runner``): transformers' models over their
own KV cache (``transformers``), and llama.cpp on a GGUF file (``llamacpp``)."""
