"""Shared fixtures: tiny phantom images written to disk, and a fast torch set-up for 2-core machines."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def fundus_png(tmp_path_factory):
    from retina_core.phantoms import fundus_phantom

    path = tmp_path_factory.mktemp("fundus") / "fundus_moderate.png"
    path.write_bytes(png_bytes(fundus_phantom("Moderate", seed=101, size=384).image))
    return path


@pytest.fixture(scope="session")
def oct_png(tmp_path_factory):
    from retina_core.phantoms import oct_phantom

    path = tmp_path_factory.mktemp("oct") / "oct_cnv.png"
    path.write_bytes(png_bytes(oct_phantom("CNV", seed=202).image))
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): on a busy
    2-core machine two threads made each small 3-D forward ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_volume_net():
    """A random-init volume model whose 3-D Grad-CAM has 2 x 4 x 4 cells (stride-1 stem, layer3) at 16 x 32 x 32."""
    from retina_core.models import create_model, get_cfg

    torch.manual_seed(0)
    name = "oct_volume_fusion3d_tiny"
    kw = {**get_cfg(name).builder_kwargs, "conv1_stride": 1}
    return create_model(name, input_size=(1, 16, 32, 32), target_layer="net.layer3", builder_kwargs=kw).eval()


@pytest.fixture(scope="session")
def realdata():
    """The real public sets (../shared/realdata, or $RETINA_REALDATA). Absent: the test skips with the reason, unless
    RETINA_REQUIRE_REALDATA=1 (set by .ci/run), where their absence is a failure."""
    import os

    from retina_core.io.realsets import realdata_root

    root = realdata_root()
    if root is None:
        msg = "real data absent: ../shared/realdata (or $RETINA_REALDATA) not found"
        if os.environ.get("RETINA_REQUIRE_REALDATA") == "1":
            pytest.fail(msg + "; CI requires it (RETINA_REQUIRE_REALDATA=1)")
        pytest.skip(msg)
    return root
