"""Configuration: parsed once from the environment (and ``.env``) into frozen sections.

``sections`` holds the types, ``loader`` reads them (``reader`` collects every problem,
``parsers`` checks single values, ``masking`` keeps secrets out of sight). Each
component receives only its own section.
"""

from service.config import sections
from service.config.loader import load_config
from service.config.masking import Secret
from service.config.sections import *  # noqa: F403  (the section types: sections.__all__)

__all__ = [*sections.__all__, "Secret", "load_config"]
