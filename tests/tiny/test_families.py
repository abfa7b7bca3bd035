"""Every built-in model family ships with a tiny offline builder (``negguide.tiny``)."""

from __future__ import annotations

from negguide import registry
from negguide import tiny

BUILTIN = registry.adapters(registry.get_plugin_manager(entry_points=False))


def test_every_builtin_adapter_has_a_tiny_builder_and_a_quick_call():
    missing = sorted(set(BUILTIN) - set(tiny.BUILDERS))
    assert not missing, f"families without a tiny builder in negguide/tiny/families/: {missing}"
    assert set(tiny.CALL_KWARGS) == set(tiny.BUILDERS)
    for family, call in tiny.CALL_KWARGS.items():
        assert isinstance(call, dict) and "prompt" not in call, family  # the caller passes the prompt


def test_every_tiny_builder_is_a_family():
    """No builder for a family negguide does not guide (a stale module would hide a removed adapter)."""
    assert sorted(set(tiny.BUILDERS) - set(BUILTIN)) == []
