"""The export phase: GGUF conversion and quantization, the smoke test in llama.cpp, the
converter's install, the Ollama Modelfile, the model card, and publishing to the Hub or a folder."""
