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
