"""``python -m megatron_dsv3.cli``: the ``megatron-dsv3`` command."""

import sys

from megatron_dsv3.cli import main

sys.exit(main())
