"""One fact stated in two files: a run's model.image_size against its sites' preprocess.image_size,
and the site key's reader named for the key it reads."""

from __future__ import annotations

import pytest
import yaml

from dicomfl.common import config
from dicomfl.common.config import load_run_config
from dicomfl.common.errors import ConfigError

from .conftest import write_site


def _run(tmp_path, site_yaml, **model) -> object:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "r", "min_sites": 1}, "model": model,
                                    "sites": [str(site_yaml)]}))
    return path


def test_a_run_whose_image_size_differs_from_a_sites_is_refused_at_load(tmp_path):
    (tmp_path / "dicom").mkdir()
    site = write_site(tmp_path, tmp_path / "dicom", preprocess={"image_size": 64})
    with pytest.raises(ConfigError) as err:
        load_run_config(_run(tmp_path, site, image_size=32))
    msg = str(err.value)
    assert "\n" not in msg and "model.image_size: 32" in msg and "sites.0's preprocess.image_size (64)" in msg
    assert load_run_config(_run(tmp_path, site, image_size=64)).model.image_size == 64
    assert load_run_config(_run(tmp_path, site)).model.image_size is None  # null: each site's size
    assert load_run_config(_run(tmp_path, site, image_size=32), check_files=False).model.image_size == 32


def test_the_site_key_reader_is_named_for_the_site_key():
    assert callable(config.read_site_key) and not hasattr(config, "read_secret")
