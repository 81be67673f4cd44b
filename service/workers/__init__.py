"""WORKERS=N: N worker processes under one command, one HTTP surface (Kafka bus only).

``supervisor`` starts the workers, replaces one that dies and stops them all on a
signal; ``slot`` is one worker index and its current process; ``surface`` is the HTTP
surface on HTTP_HOST:HTTP_PORT, answered from the workers' own endpoints;
``exposition`` merges their Prometheus texts with a ``worker`` label. With WORKERS=1
none of this runs: ``run`` runs the service in-process.
"""

from service.workers.supervisor import Supervisor, run_supervised

__all__ = ["Supervisor", "run_supervised"]
