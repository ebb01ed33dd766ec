"""Suite-wide settings: no network at run time (albumentations checks for updates on import)."""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
