"""FastGen (Ge et al., ICLR 2024): profile each KV head on the prompt, keep only what its policy needs."""
