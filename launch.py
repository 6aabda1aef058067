#!/usr/bin/env python
"""genpt-dist entry point: the same program as the `genpt-dist` console script."""

from genpt_dist.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
