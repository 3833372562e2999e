"""Test-wide settings: offline model loading, no surprise network calls, markers with reasons."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="session")
def default_export(tmp_path_factory):
    """The bundled default model's FP32 export (no token table: the text graph answers every prompt)."""
    from engine.export import export_model
    from fluorosam_common.paths import default_model_dir

    return export_model(default_model_dir(), tmp_path_factory.mktemp("default_export"), with_text_table=False)
