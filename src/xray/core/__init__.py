"""The lowest layer: constants, errors, atomic writes, config checks, process settings, file locations."""
