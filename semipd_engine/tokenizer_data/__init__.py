"""The built-in tokenizer's merges (derived from public chat text) and their measurement report."""
