"""Working with serving engines: fit a placement to a trace or load file (`place`) and export it in the forms
SGLang, TensorRT-LLM, DeepSeek EPLB and vLLM load (`export`)."""
