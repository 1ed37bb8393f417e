"""Fine-tune causal language models to follow instructions, the Dolly way."""
