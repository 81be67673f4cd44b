"""Routing rules (``ROUTES_FILE``, contract §12.8): which outputs, topics and tables
each aggregate goes to. ``rules`` holds the frozen rules, ``validation`` reads and
checks the file, ``matching`` decides the route of each aggregate."""

from service.routes.matching import DEFAULT_ROUTE, Router
from service.routes.rules import Route, Routes
from service.routes.validation import RoutesProblem, parse_routes, read_routes_file

__all__ = [
    "DEFAULT_ROUTE",
    "Route",
    "Router",
    "Routes",
    "RoutesProblem",
    "parse_routes",
    "read_routes_file",
]
