"""Registry contracts: duplicates, unknown names, config keys, capability filters, plugins."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass

import pytest

from mmbalance.balancer import Balancer
from mmbalance.errors import ConfigError, RegistryError
from mmbalance.methods import METHODS
from mmbalance.registry import Registry


@dataclass(frozen=True)
class _Cfg:
    alpha: float = 0.5  # a coefficient in [0, 1]

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def _fresh():
    reg = Registry("method", Balancer)

    @reg.register("my_method")
    class Mine(Balancer):
        Config = _Cfg
        presets = {"mosi": {"alpha": 0.25}}
        tasks = frozenset({"cls"})
        max_modalities = 2

    return reg, Mine


def test_duplicate_name_raises_naming_both_modules():
    reg, _ = _fresh()
    with pytest.raises(RegistryError) as err:

        @reg.register("my_method")
        class Other(Balancer):
            pass

    msg = str(err.value)
    assert "my_method" in msg and "Mine" in msg and "Other" in msg and __name__ in msg


def test_unknown_name_suggests_close_match():
    reg, _ = _fresh()
    with pytest.raises(RegistryError, match=r"Did you mean 'my_method'"):
        reg.get("my_metod")


def test_name_must_be_snake_case_and_subclass_base():
    reg, _ = _fresh()
    with pytest.raises(RegistryError, match="snake_case"):
        reg.register("MyMethod")
    with pytest.raises(RegistryError, match="must subclass"):
        reg.register("plain")(object)


def test_config_resolution_defaults_preset_overrides():
    reg, _ = _fresh()
    assert reg.resolve_config("my_method").alpha == 0.5
    assert reg.resolve_config("my_method", "mosi").alpha == 0.25
    assert reg.resolve_config("my_method", "mosi", {"alpha": 1.0}).alpha == 1.0


def test_unknown_key_lists_valid_fields():
    reg, _ = _fresh()
    with pytest.raises(
        ConfigError, match=r"unknown config key 'alpah'.*did you mean 'alpha'.*Valid keys: alpha"
    ):
        reg.resolve_config("my_method", None, {"alpah": 1})


def test_out_of_range_value_names_field():
    reg, _ = _fresh()
    with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\], got 3"):
        reg.build("my_method", None, alpha=3)


def test_unknown_preset_lists_presets():
    reg, _ = _fresh()
    with pytest.raises(RegistryError, match="available: mosi"):
        reg.resolve_config("my_method", "brats")


def test_names_filters_by_pattern_and_capability():
    reg, _ = _fresh()
    assert reg.names("my_*") == ["my_method"]
    assert reg.names(task="cls") == ["my_method"]
    assert reg.names(task="seg") == []
    assert reg.names(modalities=3) == []
    assert reg.names(modalities=2) == ["my_method"]


def test_builtin_methods_registered():
    assert {"joint", "unimodal"} <= set(METHODS.names())


def _write_plugin(tmp_path, dist, module, body, ep_name):
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(body))
    info = tmp_path / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[mmbalance.methods]\n{ep_name} = {module}\n")


def test_entry_point_plugin_and_broken_plugin(tmp_path, monkeypatch):
    good = """
        from mmbalance.balancer import Balancer
        from mmbalance.methods import register_method

        @register_method("plugin_good")
        class PluginGood(Balancer):
            paper = "a third-party method"
    """
    _write_plugin(tmp_path, "fake_good", "fake_good_mod", good, "plugin_good")
    _write_plugin(
        tmp_path, "fake_bad", "fake_bad_mod", "raise ImportError('boom: missing dependency')\n", "plugin_bad"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(METHODS, "_plugins_loaded", False)
    try:
        METHODS.load_plugins()
        assert "plugin_good" in METHODS.names()
        assert METHODS.get("plugin_good").paper == "a third-party method"
        assert "plugin_bad" in METHODS.broken()
        with pytest.raises(RegistryError, match="failed to import") as err:
            METHODS.get("plugin_bad")
        assert isinstance(err.value.__cause__, ImportError)
    finally:
        METHODS.unregister("plugin_good")
        METHODS.unregister("plugin_bad")
        sys.modules.pop("fake_good_mod", None)
        sys.modules.pop("fake_bad_mod", None)


def test_failing_builtin_import_fails_every_lookup_not_a_partial_registry():
    reg = Registry("method", Balancer)

    def loader():
        @reg.register("first_builtin")
        class First(Balancer):
            pass

        raise ImportError("second built-in: missing dependency")

    reg._loader = loader
    for _ in range(2):  # not only the first time: the registry stays unusable, loudly
        with pytest.raises(
            RegistryError, match="built-in methods failed to import.*missing dependency"
        ) as err:
            reg.get("first_builtin")
        assert isinstance(err.value.__cause__, ImportError)
    with pytest.raises(RegistryError, match="failed to import"):
        reg.names()


def test_plugin_named_like_a_registered_method_fails_loudly(tmp_path, monkeypatch):
    body = """
        from mmbalance.balancer import Balancer

        class Impostor(Balancer):
            paper = "a plugin reusing a built-in name"
    """
    (tmp_path / "impostor_mod.py").write_text(textwrap.dedent(body))
    info = tmp_path / "fake_impostor-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake_impostor\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mmbalance.methods]\njoint = impostor_mod:Impostor\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(METHODS, "_plugins_loaded", False)
    monkeypatch.setattr(METHODS, "_plugin_error", None)
    for _ in range(2):
        with pytest.raises(
            RegistryError,
            match=r"plugin 'joint' \(impostor_mod:Impostor.*collides with the method "
            r"'joint' already registered by mmbalance.methods.joint.Joint",
        ):
            METHODS.get("joint")
    assert "impostor_mod" not in sys.modules  # never imported, never shadowing the built-in
