"""The built-in judges, one module each, registered through ``register_judges`` like any plugin."""
