"""The patched LLaVA: MRI patch embedding, splice, freeze, presets."""
