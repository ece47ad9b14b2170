"""``python scripts/deploy_app -i <input> -o <output> -m models/model.ts`` (see app.py)."""

import sys
from pathlib import Path

# the bundle root (the folder holding the ``scripts`` package) must be importable when run as a folder
_here = Path(__file__).resolve().parent
_root = next((p for p in (_here, *_here.parents) if (p / "scripts" / "lrp").is_dir()), _here.parent.parent)
if str(_root) not in sys.path:
    sys.path.insert(0, str(_root))

from scripts.deploy_app.app import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
