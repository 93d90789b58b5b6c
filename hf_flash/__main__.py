"""``python -m hf_flash``: the same as the ``hf-flash`` command."""

from hf_flash.cli import main

raise SystemExit(main())
