"""The decayed classes accept every argument of the upstream class they extend, with upstream's default.

The diffusers models repeat upstream's ``__init__`` parameters (diffusers reads config keys from the
signature), and the config redeclares fields; these tests catch a parameter that upstream adds or
re-defaults and the decayed class does not follow.
"""

import inspect
from collections.abc import Callable, Mapping

import pytest
from diffusers import DiTTransformer2DModel, UNet2DModel
from transformers import ViTMAEConfig

from hf_resdecay import DiTDecayTransformer2DModel, UNet2DDecayModel, ViTMAEDecayConfig

_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)

CONFIG_CHANGED_DEFAULTS = {
    "layer_norm_eps": "the released MAE recipe uses 1e-6 (upstream ViTMAE 1e-12)",
}
"""``ViTMAEConfig`` fields whose default the recipe changes on purpose, with the reason."""

PAIRS = {
    "unet": (
        UNet2DModel.__init__,
        UNet2DDecayModel.__init__,
        {},
        {"shortcut_decay", "shortcut_schedule"},
    ),
    "dit": (
        DiTTransformer2DModel.__init__,
        DiTDecayTransformer2DModel.__init__,
        {},
        {"shortcut_decay", "shortcut_schedule", "long_skip_connections", "timestep_freq_shift"},
    ),
    "vit_mae_config": (
        ViTMAEConfig.__init__,
        ViTMAEDecayConfig.__init__,
        CONFIG_CHANGED_DEFAULTS,
        {
            "shortcut_decay",
            "shortcut_schedule",
            "encoder_final_layernorm",
            "zero_init_residual_branches",
            "decoder_skip_connections",
            "initializer",
        },
    ),
}
"""Upstream callable, ours, the upstream defaults ours changes on purpose, and the recipe's own parameters."""


def _parameters(function: Callable) -> dict[str, inspect.Parameter]:
    """Named parameters of ``function`` without ``self`` and ``*args`` / ``**kwargs``."""
    parameters = inspect.signature(function).parameters
    return {name: p for name, p in parameters.items() if name != "self" and p.kind not in _VARIADIC}


def _differences(upstream: Callable, ours: Callable, changed: Mapping[str, str]) -> list[str]:
    """Every upstream parameter that ours lacks, takes in another way, or defaults differently."""
    theirs, mine = _parameters(upstream), _parameters(ours)
    problems = []
    for name, parameter in theirs.items():
        if name not in mine:
            problems.append(f"{name}: not accepted")
        elif mine[name].kind != parameter.kind:
            problems.append(f"{name}: {mine[name].kind.description}, upstream {parameter.kind.description}")
        elif mine[name].default != parameter.default and name not in changed:
            problems.append(f"{name}: default {mine[name].default!r}, upstream {parameter.default!r}")
    positional = [name for name, p in theirs.items() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    if list(mine)[: len(positional)] != positional:
        problems.append(f"positional order {list(mine)[: len(positional)]}, upstream {positional}")
    return problems


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_every_upstream_parameter_is_accepted_with_its_default(name):
    upstream, ours, changed, _ = PAIRS[name]
    assert _differences(upstream, ours, changed) == []


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_only_the_recipe_adds_parameters(name):
    upstream, ours, _, recipe = PAIRS[name]
    assert set(_parameters(ours)) - set(_parameters(upstream)) == recipe


def test_config_default_changes_are_exactly_the_listed_ones():
    """A listed exception must still differ (else drop it from the list) and keep upstream's field."""
    theirs, mine = _parameters(ViTMAEConfig.__init__), _parameters(ViTMAEDecayConfig.__init__)
    changed = {name for name in theirs if name in mine and mine[name].default != theirs[name].default}
    assert changed == set(CONFIG_CHANGED_DEFAULTS)
    assert ViTMAEDecayConfig().layer_norm_eps == 1e-6
    assert ViTMAEConfig().layer_norm_eps == 1e-12


def test_differences_are_reported():
    """The comparison itself notices a missing parameter, a new default and a moved positional one."""

    def upstream(self, a: int = 1, b: int = 2, *, c: int = 3) -> None:
        """Reference signature."""

    def ours(self, b: int = 2, a: int = 5, **kwargs) -> None:
        """Swapped, re-defaulted, and ``c`` only through ``**kwargs``."""

    assert _differences(upstream, ours, {}) == [
        "a: default 5, upstream 1",
        "c: not accepted",
        "positional order ['b', 'a'], upstream ['a', 'b']",
    ]
    assert _differences(upstream, ours, {"a": "on purpose"})[0] == "c: not accepted"
