"""The project-local DAGSTER_HOME: a folder whose dagster.yaml comes from a template here:
`dagster.yaml` (SQLite, the default of `make dev` and `make demo`) or `dagster_postgres.yaml`
(PostgreSQL through dagster-postgres, connection from DAGSTER_PG_* environment variables)."""

import shutil
from pathlib import Path

TEMPLATE = Path(__file__).with_name("dagster.yaml")
POSTGRES_TEMPLATE = Path(__file__).with_name("dagster_postgres.yaml")


def ensure_dagster_home(home: Path, template: Path = TEMPLATE) -> Path:
    """Create `home` with `template` as its dagster.yaml unless it has one already."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        shutil.copyfile(template, config)
    return home
