"""Grammar-constrained decoding (upstream's `srt/constrained`)."""
