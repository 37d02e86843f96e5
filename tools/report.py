#!/usr/bin/env python
"""Results rows of a study -> the paper's Tables 3-6 as CSV and Markdown, and figures (hpcgan/report.py).

  python tools/report.py studies/paper
  python tools/report.py study=studies/paper out=paper-tables figures=false

Exit status: 0 written, 2 bad input (nothing to report).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from hpcgan.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
