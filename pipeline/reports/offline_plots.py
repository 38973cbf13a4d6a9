"""The HTML template `dvc plots show` fills, with Vega, Vega-Lite and vega-embed inlined: it draws offline.

DVC's default page loads the three libraries from a CDN, so it is blank without a network. .dvc/config points
`plots.html_template` at .dvc/plots/offline.html, which this module writes from the minified builds the `panel`
package ships (panel/dist/bundled/vegaplot; BSD-3 licensed, like Vega). Regenerate after upgrading them:

    pip install panel && python -m pipeline.reports.offline_plots        # or --from DIR with the three files
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from pipeline.io import atomic_write_text

TEMPLATE = Path(".dvc") / "plots" / "offline.html"
LIBRARIES = ("vega", "vega-lite", "vega-embed")  # in load order: each needs the ones before it

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- {versions}: inlined by pipeline/reports/offline_plots.py, so the page draws with no network. -->
{scripts}
    <style>
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def bundled_dir() -> Path:
    """Where the installed panel package keeps its Vega builds."""
    from importlib.resources import files
    return Path(str(files("panel"))) / "dist" / "bundled" / "vegaplot"


def library_files(folder: Path) -> list[Path]:
    """The build of each library in folder (panel names them NAME@VERSION), in load order."""
    found = []
    for name in LIBRARIES:
        matches = sorted(p for p in folder.iterdir() if re.fullmatch(rf"{re.escape(name)}@[0-9][\w.]*(\.min)?(\.js)?",
                                                                       p.name))
        if not matches:
            raise SystemExit(f"no {name} build in {folder}")
        found.append(matches[-1])
    return found


def render(files: list[Path]) -> str:
    scripts = []
    for path in files:
        code = path.read_text(encoding="utf-8")
        if "</script" in code.lower():
            raise SystemExit(f"{path} contains '</script': it cannot be inlined as is")
        code = re.sub(r"//# sourceMappingURL=\S+\s*$", "", code)  # no request for a map the page lacks
        scripts.append(f"    <script type=\"text/javascript\">\n{code}\n    </script>")
    versions = ", ".join(p.name.split(".min")[0].removesuffix(".js") for p in files)
    return PAGE.format(versions=versions, scripts="\n".join(scripts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, help="folder with the builds (default: panel's)")
    parser.add_argument("--out", type=Path, default=TEMPLATE)
    args = parser.parse_args(argv)
    atomic_write_text(args.out, render(library_files(args.source or bundled_dir())))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
