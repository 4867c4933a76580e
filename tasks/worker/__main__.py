"""``python -m tasks.worker --name gpu0 --device cuda:0``: start one device-bound worker."""

import sys

from tasks.worker.command import worker_main

sys.exit(worker_main())
