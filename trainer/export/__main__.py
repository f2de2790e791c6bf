"""The export's command line (trainer/export/__init__.py says what it does)."""

from __future__ import annotations

import os
import sys
from typing import Any


def main() -> None:
    import hydra

    from trainer.compose import conf_dir, register
    from trainer.errors import UserError
    from trainer.export import run_export
    from trainer.export_schema import ExportRunConfig, register_export_schema
    from trainer.log import configure_logging
    from trainer.overrides import explain

    register()
    register_export_schema()

    @hydra.main(version_base="1.3", config_path=conf_dir(), config_name="export")
    def _main(cfg: Any) -> None:
        configure_logging()
        try:
            out = run_export(cfg)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
        print(f"qforge: exported to {out}")

    os.environ["HYDRA_FULL_ERROR"] = "1"  # composition errors become one line below, as train.py does
    try:
        _main()
    except Exception as err:  # noqa: BLE001 - composition errors have no common base class
        message = explain(err, conf_dir(), ExportRunConfig)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
