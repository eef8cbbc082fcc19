"""Code shared by the HepatoAI gateway and workers."""
