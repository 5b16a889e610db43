"""Building the embedded bases (longctx-tiny, longctx-tiny-mamba) from their recipe."""
