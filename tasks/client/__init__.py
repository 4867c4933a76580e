"""What runs in the caller's process: routing glue and result helpers.

Never imports :mod:`tasks.worker`.  Import the modules themselves
(``from tasks.client.results import outputs``); this package imports nothing.
"""
