"""tinygen: a compact Llama inference engine with FastGen adaptive KV-cache compression."""
