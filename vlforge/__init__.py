"""vlforge core: settings, storage, dataset versions, tracking helpers and the demo data.

Nothing here runs at import time: no directories are created, no tracking URI is set, no Ray is started.
"""

__version__ = "0.1.0"
