"""``ha-ingestor import``: back-fill InfluxDB from Home Assistant's recorder (states and
long-term statistics), resumable and idempotent, beside a running service.

- :mod:`.options` — the command's options, parsed and checked;
- :mod:`.job` — the import: windows, mapping, checkpoints;
- :mod:`.progress` — a progress bar on a terminal, log lines otherwise;
- :mod:`.command` — connecting, the import's own spool and writer, the summary, exit status.
"""
