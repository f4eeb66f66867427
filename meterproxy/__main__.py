"""``python -m meterproxy`` is the ``meterproxy`` command."""

from meterproxy.cli import main

main()
