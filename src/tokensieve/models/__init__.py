"""What the model adapter (`tokensieve.model`) knows per family: which families run and their quirks
(`families`), and their rotary embeddings (`rope`)."""
