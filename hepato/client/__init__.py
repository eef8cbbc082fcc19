"""The Python client of the HepatoAI API (``HepatoClient``, ``AsyncHepatoClient``)."""
