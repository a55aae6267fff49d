"""Bundled model folders (config.json + model.safetensors), loadable by name with dd.load_model."""
