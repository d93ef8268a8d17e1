"""The embedded default data set: a small real-text corpus and its tokenizer."""
