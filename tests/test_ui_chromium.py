"""The UI in a real browser: headless Chromium (Debian's `chromium`) opens the asset graph
pages served by `dagster dev` and finds every asset of the graph on them."""

import shutil
import subprocess

import pytest

from blues_project import write_project
from dagster_server import dagster_dev

CHROMIUM = shutil.which("chromium")
ASSETS = {
    "data": ["raw_corpus", "tokenized_dataset", "merged_dataset"],
    "training": ["trained_model", "model_checkpoint", "model_eval"],
}


def rendered_dom(url: str, profile) -> str:
    """The page's DOM after 20 s of virtual time (the UI fetches its graph over GraphQL)."""
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1600,1000",
         "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's `chromium` is not installed (apt-get install -y chromium)")
def test_asset_graph_pages_show_every_asset(tmp_path):
    config = write_project(tmp_path, corpus_mb=0.05)
    with dagster_dev(tmp_path, config) as port:
        for group, names in ASSETS.items():
            dom = rendered_dom(f"http://127.0.0.1:{port}/locations/blues/asset-groups/{group}",
                               tmp_path / f"chromium-{group}")
            missing = [name for name in names if name not in dom]
            assert not missing, f"asset graph of group {group!r} lacks {missing}"
