"""The project-local DAGSTER_HOME: a folder whose dagster.yaml comes from the template here."""

import shutil
from pathlib import Path

TEMPLATE = Path(__file__).with_name("dagster.yaml")


def ensure_dagster_home(home: Path) -> Path:
    """Create `home` with the template dagster.yaml unless it has one already."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        shutil.copyfile(TEMPLATE, config)
    return home
