"""medssl: label-efficient medical image segmentation methods as MONAI Bundles."""

__version__ = "0.1.0"

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SCHEMA_FILE = PACKAGE_DIR / "schemas" / "meta_schema.json"

from . import utils  # noqa: E402
from . import bundles, data, engines, losses, networks, transforms  # noqa: E402

__all__ = ["bundles", "data", "engines", "losses", "networks", "transforms", "utils", "__version__"]
