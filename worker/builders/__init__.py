"""Builders of models from configuration with random weights (no download), written to
local files with their manifests, exactly as real weights would be laid out. Tests build
tiny ones; ``hepato models demo`` builds them at benchmark size."""
