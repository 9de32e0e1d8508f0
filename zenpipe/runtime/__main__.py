"""``python -m zenpipe.runtime SPEC``: one worker process (see `zenpipe.runtime.process`)."""

import sys

from .process import main

sys.exit(main())
