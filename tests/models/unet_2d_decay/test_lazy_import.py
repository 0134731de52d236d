"""diffusers stays optional: the diffusion models are imported on first access only."""

import os
import subprocess
import sys
import textwrap

CHECK = textwrap.dedent(
    """
    import sys
    import hf_resdecay
    assert "diffusers" not in sys.modules, "import hf_resdecay imported diffusers"
    assert {"UNet2DDecayModel", "DiTDecayTransformer2DModel"} <= set(dir(hf_resdecay))
    from hf_resdecay import DiTDecayTransformer2DModel, UNet2DDecayModel
    from hf_resdecay.models import unet_2d_decay
    assert UNet2DDecayModel is unet_2d_decay.UNet2DDecayModel
    assert DiTDecayTransformer2DModel.__module__ == "hf_resdecay.models.dit_decay"

    # without diffusers: a clear error naming the extra, the rest of the package unaffected
    for name in [key for key in sys.modules if key.startswith(("diffusers", "hf_resdecay.models.dit"))]:
        del sys.modules[name]
    sys.modules["diffusers"] = None
    try:
        hf_resdecay.DiTDecayTransformer2DModel
    except ImportError as error:
        assert "hf_resdecay[diffusion]" in str(error), error
    else:
        raise SystemExit("no ImportError without diffusers")
    try:
        hf_resdecay.NoSuchModel
    except AttributeError:
        pass
    else:
        raise SystemExit("unknown names must raise AttributeError")
    """
)


def test_diffusers_is_imported_only_on_first_access():
    result = subprocess.run(
        [sys.executable, "-c", CHECK],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
